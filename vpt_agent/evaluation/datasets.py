"""The VPT_Datasets format (LLaMA-Factory's sharegpt style, as the paper's test splits ship):

    [{"messages": [{"role": "user", "content": "<image>\\nQuestion?\\nIdentify the region ..."},
                   {"role": "assistant", "content": "<|region_token_start|>...<|region_token_end|>"},
                   {"role": "user", "content": "<image>"},
                   {"role": "assistant", "content": "the ground truth"}],
      "images": ["images/a.jpg", "images/a.jpg"]}, ...]

The first user turn holds the question (with the paper's prompt suffix in ``*_region_*`` and
``*_action_*`` splits), the last assistant turn the ground truth, ``images[0]`` the image (a path
relative to the dataset file's folder, or absolute). Optional keys: ``id`` (else one is derived
from the item's position and content), ``answers`` (several ground truths, e.g. VQA's ten) and
``category`` (a breakdown key in the summary).

Run ``python -m vpt_agent.evaluation.datasets OUT.json --n 200`` to export the synthetic benchmark.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from ..data.conversations import region_text
from ..data.synthetic import FAMILIES, Family, make_item
from ..errors import VPTError
from ..perception.crop import crop
from ..tokens import BRANCHES, IMAGE_PLACEHOLDER, region_box
from ..prompts import PROMPT_SUFFIXES, PromptMode, build_question

GROUND_TRUTH_PREFIX = "Now answer the question.\n"
"""Some splits open the ground-truth turn with this line; the paper's scorer drops it."""
_SUFFIXES = {
    mode: re.compile(rf"\s*{re.escape(suffix)}[.:]?", re.IGNORECASE)
    for mode, suffix in PROMPT_SUFFIXES.items()
    if suffix is not None
}


class DatasetError(VPTError, ValueError):
    """The dataset file cannot be read as a VPT_Datasets JSON list."""


@dataclass(frozen=True)
class SyntheticImage:
    """A synthetic benchmark scene, drawn when an item runs (the noisy scenes are ~1 MB as PNG)."""

    seed: int
    index: int
    family: Family

    def load(self) -> torch.Tensor:
        return make_item(self.seed, self.index, (self.family,)).image


@dataclass(frozen=True)
class EvalItem:
    """One dataset item as the graph takes it; `problem` says why it cannot be run (else None)."""

    id: str
    index: int
    """Position in the dataset file."""
    image: str | SyntheticImage | None
    """Absolute path of the first image, or the synthetic scene."""
    question: str
    """The question without image placeholders and without the paper's prompt suffix."""
    prompt_mode: PromptMode
    """The mode whose suffix the question carried ("region", "reencode"), else "free"."""
    answers: tuple[str, ...]
    category: str | None = None
    problem: str | None = None


@dataclass(frozen=True)
class Dataset:
    name: str
    """The file's stem, e.g. ``TextVQA_region_test`` (chooses the default metric)."""
    path: Path
    items: tuple[EvalItem, ...]
    problems: tuple[str, ...]
    """Items left out of `items` (duplicate ids), one line each."""

    @property
    def prompt_mode(self) -> PromptMode:
        """The prompt most items carry: the split's own mode."""
        return Counter(item.prompt_mode for item in self.items).most_common(1)[0][0] if self.items else "free"


def read_dataset(path: str | Path) -> Dataset:
    """Read a VPT_Datasets JSON list. A bad item becomes an `EvalItem` with a `problem`; an item
    whose id repeats an earlier one is left out and reported in `Dataset.problems`."""
    path = Path(path)
    records = read_records(path)
    items: list[EvalItem] = []
    problems: list[str] = []
    first: dict[str, int] = {}
    for index, record in enumerate(records):
        item = parse_item(record, index, path.resolve().parent)
        if item.id in first:
            problems.append(f"item {index}: duplicate id {item.id!r} (first at item {first[item.id]}), left out")
            continue
        first[item.id] = index
        items.append(item)
    return Dataset(path.stem, path.resolve(), tuple(items), tuple(problems))


def read_records(path: Path) -> list[Any]:
    """The JSON list of a VPT_Datasets file, unchecked item by item; a `DatasetError` if there is none."""
    try:
        records = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DatasetError(f"no such dataset file: {path}") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"{path} is not a readable JSON file: {exc}") from None
    if not isinstance(records, list):
        raise DatasetError(f"{path} must hold a JSON list of items, not a {type(records).__name__}")
    return records


def parse_item(record: Any, index: int, root: Path) -> EvalItem:
    """One JSON item -> `EvalItem`; never raises (what is wrong goes to `problem`)."""
    item_id = _item_id(record, index)
    if not isinstance(record, dict):
        return EvalItem(item_id, index, None, "", "free", (), problem=f"not a JSON object: {type(record).__name__}")
    messages = record.get("messages")
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("content"), str) for m in messages
    ):
        messages = []
    user = next((m["content"] for m in messages if m.get("role") == "user"), None)
    assistant = next((m["content"] for m in reversed(messages) if m.get("role") == "assistant"), None)
    question, mode = split_prompt(user or "")
    answers = _answers(record.get("answers"), assistant)
    images = record.get("images")
    image = images[0] if isinstance(images, list) and images and isinstance(images[0], str) else None
    image_path = str(root / image) if image else None  # an absolute image path stays as it is
    category = record.get("category")
    problem = None
    if user is None:
        problem = "no user turn with the question"
    elif not question:
        problem = "empty question"
    elif not answers:
        problem = "no ground truth (no assistant turn)"
    elif image_path is None:
        problem = "no image"
    elif not Path(image_path).is_file():
        problem = f"image not found: {image_path}"
    return EvalItem(
        item_id, index, image_path, question, mode, answers,
        category=str(category) if category is not None else None, problem=problem,
    )


def split_prompt(text: str) -> tuple[str, PromptMode]:
    """A first user turn -> (question without placeholders and suffix, the suffix's mode or "free")."""
    text = text.replace(IMAGE_PLACEHOLDER, "")
    for mode, pattern in _SUFFIXES.items():
        text, found = pattern.subn("", text, count=1)
        if found:
            return text.strip(), mode
    return text.strip(), "free"


def export_synthetic(
    path: str | Path, n: int, *, seed: int = 0, mode: PromptMode = "region", families: Sequence[Family] = FAMILIES
) -> Path:
    """Write synthetic benchmark items 0..n-1 of stream `seed` as a VPT_Datasets file, images
    beside it in ``<stem>_images/``. ``region`` items carry the target region turn and its crop,
    ``reencode`` items the DINO action turn, ``free`` / ``direct`` items the question alone."""
    path = Path(path)
    folder = path.parent / f"{path.stem}_images"
    folder.mkdir(parents=True, exist_ok=True)
    dino = BRANCHES["dino"]
    records = []
    for index in range(n):
        item = make_item(seed, index, families)
        image = f"{folder.name}/{index:06d}.png"
        Image.fromarray(item.image.permute(1, 2, 0).numpy()).save(path.parent / image)
        question = build_question(item.question, mode)
        messages = [{"role": "user", "content": f"{IMAGE_PLACEHOLDER}\n{question}"}]
        record: dict[str, Any] = {"id": f"synthetic-{seed}-{index}", "category": item.family}
        images = [image]
        if mode == "region":
            crop_image = f"{folder.name}/{index:06d}_crop.png"
            pixels = crop(item.image, region_box(item.cells, item.size)[1])
            Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(path.parent / crop_image)
            images.append(crop_image)
            messages += [
                {"role": "assistant", "content": region_text(item.cells)},
                {"role": "user", "content": IMAGE_PLACEHOLDER},
            ]
        elif mode == "reencode":
            record["detection_images"] = [image]
            messages += [
                {"role": "assistant", "content": dino.action_text},
                {"role": "user", "content": "<detection_image>"},
            ]
        messages.append({"role": "assistant", "content": item.answer})
        records.append({**record, "messages": messages, "images": images})
    path.write_text(json.dumps(records, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return path


def synthetic_dataset(seed: int, per_family: int) -> Dataset:
    """The synthetic benchmark's held-out stream ``seed``: ``per_family`` questions of each family
    (question j of family k is item ``j * 4 + k`` of the stream, so every question has its own scene
    and a larger ``per_family`` extends a smaller one), asked without a suffix (modes add theirs)."""
    if per_family < 1:
        raise DatasetError(f"per_family must be positive, got {per_family}")
    items = []
    for j in range(per_family):
        for k, family in enumerate(FAMILIES):
            index = j * len(FAMILIES) + k
            item = make_item(seed, index, (family,))
            items.append(EvalItem(f"synthetic-{seed}-{index}", len(items), SyntheticImage(seed, index, family),
                                  item.question, "free", (item.answer,), category=family))
    return Dataset(f"synthetic-seed{seed}-{per_family}-per-family", Path(f"synthetic:{seed}"), tuple(items), ())


def _item_id(record: Any, index: int) -> str:
    given = record.get("id") if isinstance(record, dict) else None
    if isinstance(given, (str, int)) and not isinstance(given, bool) and str(given).strip():
        return str(given).strip()
    content = json.dumps(record, sort_keys=True, ensure_ascii=False, default=str)
    return f"{index}-{hashlib.sha256(content.encode()).hexdigest()[:8]}"


def _answers(given: Any, assistant: str | None) -> tuple[str, ...]:
    if isinstance(given, list) and given and all(isinstance(a, str) for a in given):
        return tuple(given)
    if assistant is None:
        return ()
    answer = assistant.removeprefix(GROUND_TRUTH_PREFIX).strip()
    return (answer,) if answer else ()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Export the synthetic benchmark as a VPT_Datasets file.")
    parser.add_argument("out", help="the JSON file to write (images go to <stem>_images/ beside it)")
    parser.add_argument("--n", type=int, default=200, help="number of items (default 200)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--mode", choices=tuple(PROMPT_SUFFIXES), default="region",
                        help="prompt suffix and perception turn (default region)")
    args = parser.parse_args(argv)
    print(export_synthetic(args.out, args.n, seed=args.seed, mode=args.mode))


if __name__ == "__main__":
    main()
