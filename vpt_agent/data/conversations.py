"""Benchmark items as training conversations, token for token what a `Conversation` feeds the model
(both build their turns with `vpt_agent.prompts`).

A conversation is the system turn, the user turn (global image + "\\n" + question with the mode's
suffix), then either the answer, or a perception round and the answer:

* region: the assistant emits the item's region cells (every covered ``<|x_i|>``, then every
  ``<|y_j|>``) and ``<|im_end|>``; the next user turn shows the crop (region box with the parser's
  one-cell margin; a single object's crop fits in 512 px, so it keeps full resolution);
* reencode: the assistant emits the branch's ``<|X_action_start|><|X_action|><|X_action_end|>`` and
  ``<|im_end|>``; the next user turn holds the placeholders that the conditioned features replace:
  256 ``<|detection_image_pad|>`` for DINO (`detection_images` input), or one ``<|clip_image_pad|>``
  per merged token of the model's own ViT on the whole image within the clip budget (`Example.clip`).

Routes by prompt mode (`route`): ``region`` and ``reencode`` always take their perception round;
``free`` (no suffix, the model decides) crops for fine_detail, re-encodes counting where the
re-encoding sees the whole image finer than the global view (a clip branch with a larger budget),
and answers the other families directly; ``direct`` answers at once. Labels are -100 outside
assistant turns.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import torch

from ..model.reference import rope_index
from ..perception.crop import crop
from ..perception.dino import preprocess_dino
from ..perception.qwen_image import num_image_tokens, qwen_pixel_values
from ..prompts import (
    DEFAULT_SYSTEM,
    PromptMode,
    build_question,
    first_turn_ids,
    reencode_turn_ids,
    region_turn_ids,
)
from ..tokens import BRANCHES, IM_END, IMAGE_PAD, REGION_END, REGION_START, X_TOKENS, Y_TOKENS, Box, Cells, region_box
from .synthetic import COLOURS, COMPARING, COUNTING, READING, SHAPES, Item, SceneObject, block_scene, cells_covering
from .token_labels import IGNORE, View, labelled_view, token_index, view_labels

Route = Literal["region", "reencode", "answer"]
GROUNDING_QUESTION = "Where is each shape?"
"""The auxiliary grounding task's question (`grounding_example`)."""
BLOCK_QUESTION = "What character is in each shape?"
"""The auxiliary block reading task's question (`block_reading_example`)."""


@dataclass
class Example:
    """One training conversation."""

    input_ids: torch.Tensor  # (L,)
    labels: torch.Tensor  # (L,), IGNORE outside assistant turns
    pixel_values: torch.Tensor  # (P, 1176): the global image, then the crop if any
    image_grid_thw: torch.Tensor  # (n_images, 3)
    detection_images: torch.Tensor | None  # (1, 3, 224, 224) for the reencode route, dino branch
    token_labels: torch.Tensor  # (image tokens, 4): `token_labels.view_labels` of each image, in order
    focus: torch.Tensor
    """(n, 3) rows (query position, image token position, head): the supervised token after each
    query position is about the object in that image token, which that attention head is to look
    at (the auxiliary attention loss)."""
    clip: View | None = None
    """The reencode route's clip branch input: the whole image within the clip budget, labelled."""


def route(item: Item, mode: PromptMode, sees_more: bool = False) -> Route:
    """What the assistant does first for ``item`` under prompt ``mode``: in free mode, the perception
    that helps the family (a crop to read; to count, a re-encoding if it sees the whole image finer
    than the global view, ``sees_more``: `finer_reencoding`), else the answer."""
    if mode == "free":
        if item.family in READING:
            return "region"
        return "reencode" if item.family in COUNTING and sees_more else "answer"
    return {"region": "region", "reencode": "reencode", "direct": "answer"}[mode]


def finer_reencoding(branch: str, max_pixels: int | None, clip_max_pixels: int | None) -> bool:
    """Whether re-encoding with ``branch`` sees the image at more pixels than the global view within
    ``max_pixels``: only the clip branch within a larger ``clip_max_pixels`` (DINO sees 224x224, and
    a clip budget of None is the global view's)."""
    return branch == "clip" and None not in (max_pixels, clip_max_pixels) and clip_max_pixels > max_pixels


def region_text(cells: Cells) -> str:
    """Region tokens naming every cell column, then every cell row, of ``cells``."""
    x0, y0, x1, y1 = cells
    return REGION_START + "".join(X_TOKENS[x0 : x1 + 1]) + "".join(Y_TOKENS[y0 : y1 + 1]) + REGION_END


def build_example(
    item: Item,
    mode: PromptMode,
    tokenizer,
    *,
    system_prompt: str = DEFAULT_SYSTEM,
    action_labels: bool = True,
    max_pixels: int | None = None,
    branch: str = "dino",
    clip_max_pixels: int | None = None,
) -> Example:
    """The training conversation of ``item`` under prompt ``mode``.

    Supervised: every assistant token and each assistant turn's ``<|im_end|>``. ``action_labels=False``
    masks ``<|X_action|><|X_action_end|>`` as the reference training does (its generate forces the
    action token after the start token); `VPTSession` forces nothing and stops at the action end,
    so a model it serves must learn to emit them (the default). ``max_pixels`` is the model's
    ``image_max_pixels``; ``branch`` the re-encoding branch ("dino", or "clip": the model's own ViT
    within ``clip_max_pixels``, the model's ``reencode_max_pixels``). The region tokens and the
    answer are focused on the tokens of the objects the question is about (in the global image,
    then in the last image, or the re-encoding for a reading; a comparison's answer in the global image).
    """
    kind = route(item, mode, finer_reencoding(branch, max_pixels, clip_max_pixels))
    views = [(0, 0, *item.size)]
    if kind == "region":
        views.append(region_box(item.cells, item.size)[1])
    pixel_values, grid = qwen_pixel_values([crop(item.image, view) for view in views], max_pixels=max_pixels)
    token_labels = torch.cat([view_labels(item.objects, view, g, global_view=k == 0)
                              for k, (view, g) in enumerate(zip(views, grid.tolist()))])
    turns = _Turns(tokenizer, first_turn_ids(tokenizer, build_question(item.question, mode),
                                             num_image_tokens(grid[0]), system_prompt))
    detection_images = clip = None
    if kind == "reencode":
        spec = BRANCHES[branch]
        turns.add(spec.action_start, supervised=True)
        turns.add(spec.action + spec.action_end, supervised=action_labels)
        turns.add(IM_END, supervised=True)
        if branch == "clip":
            clip = labelled_view(item.image, item.objects, views[0], clip_max_pixels, glyphs=True)
            placeholders = num_image_tokens(clip.image_grid_thw[0])
        else:
            detection_images, placeholders = preprocess_dino(item.image)[None], spec.num_placeholders()
        turns.add_ids(reencode_turn_ids(tokenizer, branch, placeholders))
    elif kind == "region":
        turns.add(region_text(item.cells), supervised=True, focus=[turns.keys(item.about, 0, views[0], grid[0])])
        turns.add(IM_END, supervised=True)
        turns.add_ids(region_turn_ids(tokenizer, [num_image_tokens(grid[1])]))
    # where the answer looks: a reading at the clip re-encoding if there is one; a comparison (one
    # head per object: their mean position says nothing) at the global view, which shows both wherever
    # the model's crop falls; anything else at the last image (the crop, else the global view: at 512
    # px an object spans several re-encoded tokens, and counting their centres went off by one)
    comparing = item.family in COMPARING
    about = [(obj,) for obj in item.about] if comparing else [item.about]
    if clip is not None and item.family in READING:
        look = (0, views[0], clip.image_grid_thw[0], tokenizer.convert_tokens_to_ids(BRANCHES["clip"].image_pad))
    else:
        look = (0, views[0], grid[0], None) if comparing else (len(views) - 1, views[-1], grid[-1], None)
    turns.add(item.answer, supervised=True, focus=[turns.keys(objects, *look) for objects in about])
    turns.add(IM_END, supervised=True)
    return turns.example(pixel_values, grid, detection_images, token_labels, clip)


def grounding_example(
    item: Item, tokenizer, *, system_prompt: str = DEFAULT_SYSTEM, max_pixels: int | None = None
) -> Example:
    """An auxiliary training conversation (not a benchmark question): `GROUNDING_QUESTION` about
    the global image, answered with every object's name and cells, in the order of `COLOURS`, then
    `SHAPES`: each name is followed by its region (focused on the object), so one image gives 4-8
    name -> region lookups (the skill region mode needs) where a benchmark question gives one."""
    colours, shapes = list(COLOURS), list(SHAPES)
    objects = sorted(item.objects, key=lambda o: (colours.index(o.colour), shapes.index(o.shape)))
    lines = [(o.name, region_text(cells_covering(o.box, item.size)), o) for o in objects]
    return _one_round(item.image, item.objects, (0, 0, *item.size), GROUNDING_QUESTION, lines, tokenizer,
                      system_prompt, max_pixels)


def block_reading_example(
    seed: int, index: int, tokenizer, *, system_prompt: str = DEFAULT_SYSTEM, max_pixels: int | None = None
) -> Example:
    """An auxiliary training conversation: the view a region of one cell shows (`block_scene`'s
    3x3 block, 9 objects) as the only image, `BLOCK_QUESTION`, and each object's name and glyph
    (focused on the object) in reading order: 9 glyphs to read per image where a fine_detail
    question has one."""
    image, objects, cells = block_scene(seed, index)
    view = region_box(cells, (image.shape[2], image.shape[1]))[1]
    lines = [(o.name, f" {o.glyph}", o) for o in objects]
    return _one_round(image, objects, view, BLOCK_QUESTION, lines, tokenizer, system_prompt, max_pixels)


def reading_example(
    item: Item, tokenizer, *, system_prompt: str = DEFAULT_SYSTEM, max_pixels: int | None = None
) -> Example:
    """An auxiliary training conversation: the crop region mode would show for ``item`` as the
    only image, the item's question and its answer (reading without the global view: half the
    cost of a region conversation)."""
    view = region_box(item.cells, item.size)[1]
    lines = [("", item.answer, obj) for obj in item.about[:1]]
    return _one_round(item.image, item.objects, view, item.question, lines, tokenizer, system_prompt, max_pixels)


def _one_round(
    image: torch.Tensor,
    objects: tuple[SceneObject, ...],
    view: Box,
    question: str,
    lines: list[tuple[str, str, SceneObject]],
    tokenizer,
    system_prompt: str,
    max_pixels: int | None,
) -> Example:
    """One round about the ``view`` box of ``image`` (the whole image: a global view), answered
    with ``lines`` (text, then text focused on an object) joined by newlines."""
    seen = labelled_view(image, objects, view, max_pixels)
    grid = seen.image_grid_thw
    turns = _Turns(tokenizer, first_turn_ids(tokenizer, question, num_image_tokens(grid[0]), system_prompt))
    for k, (text, focused, obj) in enumerate(lines):
        turns.add("\n" * (k > 0) + text, supervised=True)
        turns.add(focused, supervised=True, focus=[turns.keys((obj,), 0, view, grid[0])])
    turns.add(IM_END, supervised=True)
    return turns.example(seen.pixel_values, grid, None, seen.token_labels)


class _Turns:
    """A conversation's token ids, labels and attention focus as it is built."""

    def __init__(self, tokenizer, ids: list[int]) -> None:
        self.tokenizer, self.ids, self.labels = tokenizer, list(ids), [IGNORE] * len(ids)
        self.focus: list[tuple[int, int, int]] = []
        self.pad = tokenizer.convert_tokens_to_ids(IMAGE_PAD)

    def add(self, text: str, supervised: bool = False, focus: Sequence[list[int]] = ()) -> None:
        """Append ``text``; each of its tokens is to be predicted with attention head ``h`` looking at
        the positions ``focus[h]``."""
        self.add_ids(_ids(self.tokenizer, text), supervised, focus)

    def add_ids(self, new: list[int], supervised: bool = False, focus: Sequence[list[int]] = ()) -> None:
        """`add` for token ids (a user turn from `vpt_agent.prompts`)."""
        start = len(self.ids)
        self.ids.extend(new)
        self.labels.extend(new if supervised else [IGNORE] * len(new))
        self.focus.extend((position - 1, key, head) for position in range(start, start + len(new))
                          for head, keys in enumerate(focus) for key in keys)

    def keys(self, objects, image: int, view: Box, grid_thw: torch.Tensor, pad: int | None = None) -> list[int]:
        """Positions of the tokens of image number ``image`` (showing ``view``) holding ``objects``;
        ``pad``: the placeholder whose runs are the images (default ``<|image_pad|>``)."""
        pad = self.pad if pad is None else pad
        pads = [i for i, token in enumerate(self.ids) if token == pad]
        starts = [p for k, p in enumerate(pads) if k == 0 or pads[k - 1] != p - 1]
        indices = (token_index(obj, view, grid_thw.tolist()) for obj in objects)
        return [starts[image] + index for index in indices if index is not None]

    def example(self, pixel_values, grid, detection_images, token_labels, clip: View | None = None) -> Example:
        focus = torch.tensor(self.focus, dtype=torch.long).reshape(-1, 3)
        return Example(torch.tensor(self.ids), torch.tensor(self.labels), pixel_values, grid, detection_images,
                       token_labels, focus, clip)


def _ids(tokenizer, text: str) -> list[int]:
    """Template text (special tokens recognised)."""
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def padded_batch(samples: Sequence, model, pad_token_id: int) -> dict[str, torch.Tensor]:
    """The text part of a training batch of `samples` (each with ``input_ids``, ``labels`` and
    ``image_grid_thw``): right-padded ids and labels, attention mask, and M-RoPE `position_ids`
    (3, B, L) numbered by `model`, all rows at once (with right padding each row gets its own)."""
    length = max(len(s.input_ids) for s in samples)
    input_ids = torch.full((len(samples), length), pad_token_id)
    labels = torch.full((len(samples), length), IGNORE)
    attention_mask = torch.zeros(len(samples), length, dtype=torch.long)
    for row, sample in enumerate(samples):
        input_ids[row, : len(sample.input_ids)] = sample.input_ids
        labels[row, : len(sample.labels)] = sample.labels
        attention_mask[row, : len(sample.input_ids)] = 1
    with torch.no_grad():
        position_ids = rope_index(model, input_ids, torch.cat([s.image_grid_thw for s in samples]))
    return {"input_ids": input_ids, "labels": labels, "attention_mask": attention_mask, "position_ids": position_ids}
