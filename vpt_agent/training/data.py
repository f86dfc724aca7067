"""VPT_Datasets conversations as training sequences, token for token what the session feeds the
model for the same turns (both build every turn with `vpt_agent.prompts`).

What is learnt, following the reference (LLaMA-Factory SFT) and `vpt_agent.data.conversations`:

* The first user turn is the session's: the system prompt (the item's ``system`` message, else the
  default), the image, and the question with its prompt suffix rewritten as `build_question` writes
  it (the eval reader's `split_prompt` finds the suffix).
* Labels are the assistant turns only: every token of each assistant turn and its ``<|im_end|>``;
  the system and user turns, the images and the placeholders are -100. The VPT tokens are
  supervised, the action token and action end included: the reference masks
  ``<|X_action|><|X_action_end|>`` (its generate forces them), but `VPTSession` forces nothing, so
  a model it serves must emit them (the demo trainer's default, ``action_labels=True``).
* A region turn (``<|region_token_start|>`` … ``<|region_token_end|>``) is followed by the user
  turn the session builds: the crop(s) cut from the original image by the parser's box (one-cell
  margin), ``<image>`` or ``Region i: <image>\\n`` each; the dataset's own crop file is not read.
* A re-encoding turn is followed by the branch's placeholder turn; the branch's encoder input is
  computed from the original image (DINOv2 / SAM preprocessing, or the model's own ViT for clip).
  With ``branch`` every re-encoding turn is trained as that branch's, whichever the file names.
* Any other assistant turn before the last is plain text, and the user turn after it plain text.
* The paragraph mask (``para_mask_id``) is the model's: its forward applies it from the config.
* Positions are the 3-D M-RoPE ids the session uses (`rope_index`), not the reference training's
  plain 0..L-1.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..data.conversations import padded_batch
from ..data.token_labels import IGNORE
from ..evaluation.datasets import DatasetError, parse_item, read_records, split_prompt
from ..images import load_image
from ..model.config import VPTFields
from ..perception.crop import crops
from ..perception.dino import preprocess_dino
from ..perception.qwen_image import num_image_tokens, qwen_pixel_values
from ..perception.sam import preprocess_sam
from ..prompts import (
    DEFAULT_SYSTEM,
    build_question,
    first_turn_ids,
    reencode_turn_ids,
    region_turn_ids,
    text_turn_ids,
)
from ..tokens import BRANCHES, IM_END, parse_actions


@dataclass(frozen=True)
class Round:
    """An assistant turn and the user turn after it (None after the last)."""

    assistant: str
    """The assistant's text as trained (a re-encoding request already in the trained branch's tokens)."""
    kind: str
    """"region", "reencode" or "text" (the last turn is always "text")."""
    branch: str | None = None
    user: str | None = None


@dataclass(frozen=True)
class SFTItem:
    """One VPT_Datasets conversation, checked."""

    id: str
    image: str
    system: str
    question: str
    """The first user turn's question with its prompt suffix, as the session takes it."""
    rounds: tuple[Round, ...]


@dataclass
class Sample:
    """One training sequence and its image inputs."""

    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,), IGNORE outside assistant turns
    pixel_values: torch.Tensor  # (P, 1176): the image, then its crops
    image_grid_thw: torch.Tensor  # (n_images, 3)
    branch_inputs: dict[str, torch.Tensor] = field(default_factory=dict)
    """The forward's encoder inputs for this sequence's re-encoding turns (detection_images, ...)."""


def read_sft_items(paths: Sequence[str | Path], branches: Sequence[str], branch: str | None = None) -> list[SFTItem]:
    """Every conversation of the VPT_Datasets files, in order; a `DatasetError` names the first item
    the model cannot be trained on (no image, turns out of order, a branch the model lacks)."""
    items = []
    for path in map(Path, paths):
        for index, record in enumerate(read_records(path)):
            try:
                items.append(_sft_item(record, index, path.resolve().parent, branches, branch))
            except DatasetError as exc:
                raise DatasetError(f"{path}: item {index}: {exc}") from None
    if not items:
        raise DatasetError(f"no conversations in {', '.join(map(str, paths))}")
    return items


def _sft_item(record: Any, index: int, root: Path, branches: Sequence[str], branch: str | None) -> SFTItem:
    item = parse_item(record, index, root)
    if item.problem:
        raise DatasetError(item.problem)
    messages = record["messages"]
    system = DEFAULT_SYSTEM
    if messages and messages[0].get("role") == "system":
        system, messages = messages[0]["content"], messages[1:]
    roles = [m.get("role") for m in messages]
    if len(roles) % 2 or roles != ["user", "assistant"] * (len(roles) // 2):
        raise DatasetError(f"turns must alternate user, assistant, ... and end with the assistant's, not {roles}")
    question, mode = split_prompt(messages[0]["content"])
    rounds = []
    for k in range(1, len(messages), 2):
        text = messages[k]["content"]
        user = messages[k + 1]["content"] if k + 1 < len(messages) else None
        rounds.append(Round(text, "text") if user is None else _round(text, user, branches, branch))
    return SFTItem(item.id, str(item.image), system, build_question(question, mode), tuple(rounds))


def _round(text: str, user: str, branches: Sequence[str], branch: str | None) -> Round:
    """A turn before the last: what it asks for decides what the next user turn holds."""
    parsed = parse_actions(text, allowed_branches=set(BRANCHES))
    if parsed.kind == "region":
        return Round(text, "region")
    if parsed.kind == "reencode":
        name = branch or parsed.reencode.branch
        if name not in branches:
            raise DatasetError(f"a {name} re-encoding turn, but the model has only {list(branches)} (see --branch)")
        return Round(BRANCHES[name].action_text, "reencode", name)
    if parsed.kind == "none":
        return Round(text, "text", user=user)
    raise DatasetError(f"an assistant turn before the last that cannot be followed: {parsed.error or parsed.kind}")


def build_sample(item: SFTItem, image: torch.Tensor, tokenizer, image_processor=None,
                 config: VPTFields | None = None) -> Sample:
    """The training sequence of ``item`` on its uint8 (3, H, W) ``image``, seen as the model with
    ``image_processor`` and ``config`` sees it (its `image_max_pixels` and `reencode_max_pixels`;
    None: the processor's budget)."""
    max_pixels, clip_budget = ((config.image_max_pixels, config.reencode_max_pixels) if config is not None
                               else (None, None))

    def pixels(images: list[torch.Tensor], budget: int | None = max_pixels) -> tuple[torch.Tensor, torch.Tensor]:
        return qwen_pixel_values(images, image_processor, max_pixels=budget)

    values, grid = pixels([image])
    all_values, all_grids = [values], [grid]
    ids = first_turn_ids(tokenizer, item.question, num_image_tokens(grid), item.system)
    labels = [IGNORE] * len(ids)
    branch_inputs: dict[str, list[torch.Tensor]] = {}

    def add(new: list[int], supervised: bool) -> None:
        ids.extend(new)
        labels.extend(new if supervised else [IGNORE] * len(new))

    for turn in item.rounds:
        add(tokenizer(turn.assistant + IM_END, add_special_tokens=False)["input_ids"], supervised=True)
        if turn.kind == "region":
            boxes = [r.box for r in parse_actions(turn.assistant, (image.shape[2], image.shape[1])).regions]
            values, grid = pixels(crops(image, boxes))
            all_values.append(values)
            all_grids.append(grid)
            add(region_turn_ids(tokenizer, [num_image_tokens(g) for g in grid]), supervised=False)
        elif turn.kind == "reencode":
            inputs, placeholders = _branch_inputs(turn.branch, image, partial(pixels, budget=clip_budget))
            for key, value in inputs.items():
                branch_inputs.setdefault(key, []).append(value)
            add(reencode_turn_ids(tokenizer, turn.branch, placeholders), supervised=False)
        elif turn.user is not None:
            add(text_turn_ids(tokenizer, turn.user), supervised=False)
    return Sample(torch.tensor(ids), torch.tensor(labels), torch.cat(all_values), torch.cat(all_grids),
                  {key: torch.cat(value) for key, value in branch_inputs.items()})


def _branch_inputs(branch: str, image: torch.Tensor, pixels) -> tuple[dict[str, torch.Tensor], int]:
    """(the forward's encoder inputs for one image, its placeholder count) as `branch_features` computes them."""
    if branch == "dino":
        return {"detection_images": preprocess_dino(image)[None]}, BRANCHES[branch].num_placeholders()
    if branch == "sam":
        return {"seg_images": preprocess_sam(image)[None]}, BRANCHES[branch].num_placeholders()
    values, grid = pixels([image])
    return {"clip_pixel_values": values, "clip_images_grid_thw": grid}, num_image_tokens(grid)


class SFTDataset(Dataset):
    """`SFTItem`s as `Sample`s, built when asked for (images read then)."""

    def __init__(self, items: Sequence[SFTItem], tokenizer, image_processor=None, config: VPTFields | None = None):
        self.items, self.tokenizer, self.image_processor, self.config = list(items), tokenizer, image_processor, config

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> Sample:
        item = self.items[index]
        return build_sample(item, load_image(item.image), self.tokenizer, self.image_processor, self.config)


@dataclass
class Collator:
    """Right-padded batches with the session's M-RoPE `position_ids` (3, B, L); ``model`` (the VPT
    model, not a wrapper) only numbers them. ``logits_to_keep``: the positions whose next token is
    supervised in some row (`supervised_positions`), the only ones the loss needs logits of."""

    model: Any
    pad_token_id: int

    def __call__(self, samples: list[Sample]) -> dict[str, torch.Tensor | bool]:
        batch = {**padded_batch(samples, self.model, self.pad_token_id),
                 "pixel_values": torch.cat([s.pixel_values for s in samples]),
                 "image_grid_thw": torch.cat([s.image_grid_thw for s in samples]),
                 "use_cache": False}  # training keeps no KV cache
        batch["logits_to_keep"] = supervised_positions(batch["labels"])
        for key in sorted({key for s in samples for key in s.branch_inputs}):
            batch[key] = torch.cat([s.branch_inputs[key] for s in samples if key in s.branch_inputs])
        return batch


def supervised_positions(labels: torch.Tensor) -> torch.Tensor:
    """(K,) the sequence positions of (B, L) ``labels`` whose next token is supervised in some row: the
    logits the next-token loss reads (a few dozen of a sequence's hundreds; each is a vocabulary wide)."""
    return (labels[:, 1:] != IGNORE).any(0).nonzero().squeeze(1)
