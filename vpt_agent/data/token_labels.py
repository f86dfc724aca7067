"""Per-token labels for the demo model's auxiliary vision loss: what each merged image token of a
training view shows.

Trained through the LLM's loss alone, the demo model's image tokens converge to one shared
direction and it learns neither where an object is nor what it holds
(tools/results/diagnose_demo_cpu.txt). A training-only linear head on the merger's output
(`vpt_agent.train.TokenHead`) therefore classifies every merged token, with the columns of
`COLUMNS`:

* ``name``: 0 (no object centred in the token) or 1 + the index in `NAMES` of the object whose
  centre it holds;
* ``x`` / ``y``: the grid cell of the token's centre (global views only: a crop does not show where
  it lies), from which the ViT learns absolute position (its 2D RoPE alone is relative);
* ``glyph``: the index in `GLYPHS` of the centred object's glyph (crop views, and whole-image
  re-encodings at reading resolution: unreadable in the global view), else `IGNORE`.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from ..perception.crop import crop
from ..perception.qwen_image import qwen_pixel_values
from ..tokens import NUM_CUT, Box, region_box
from .synthetic import COLOURS, GLYPHS, SHAPES, SceneObject, block_scene

IGNORE = -100
"""The label no loss is computed on (`torch.nn.functional.cross_entropy`'s ignore_index)."""
NAMES: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
COLUMNS: dict[str, int] = {"name": 1 + len(NAMES), "x": NUM_CUT, "y": NUM_CUT, "glyph": len(GLYPHS)}
"""Label column -> number of classes."""
VIEWS_PER_BLOCK = 4
"""`block_view`s drawn from one rendered `block_scene` (rendering is ~2/3 of a view's cost)."""


@dataclass
class View:
    """A view of a scene as the ViT gets it and its merged tokens' labels: a vision-stage sample."""

    pixel_values: torch.Tensor  # (P, 1176)
    image_grid_thw: torch.Tensor  # (1, 3)
    token_labels: torch.Tensor  # (image tokens, len(COLUMNS))


def labelled_view(image: torch.Tensor, objects: Sequence[SceneObject], view: Box, max_pixels: int | None,
                  *, glyphs: bool | None = None) -> View:
    """The pixel box ``view`` of the uint8 (3, H, W) scene ``image`` (the whole image: a global view)
    preprocessed within ``max_pixels``, with its `view_labels` (``glyphs``: see there)."""
    pixel_values, grid = qwen_pixel_values([crop(image, view)], max_pixels=max_pixels)
    global_view = tuple(view) == (0, 0, image.shape[2], image.shape[1])
    return View(pixel_values, grid, view_labels(objects, view, grid[0].tolist(), global_view=global_view,
                                                glyphs=glyphs))


def block_view(seed: int, index: int, max_pixels: int | None) -> View:
    """View ``index`` of the vision stage's reading stream: the crop of `block_scene` ``(seed,
    index // VIEWS_PER_BLOCK)``'s block (what a region of its centre cell shows) moved by up to
    half a cell and scaled by 0.8-1.25, so the characters fall at every offset within the ViT's
    tokens and at the scales crops show them (a border crop is smaller: less downscaled)."""
    image, objects, cells = _block_scene(seed, index // VIEWS_PER_BLOCK)
    rng = np.random.default_rng([seed, index, 4])
    height, width = image.shape[1:]
    x0, y0, x1, y1 = region_box(cells, (width, height))[1]
    scale, (dx, dy) = rng.uniform(0.8, 1.25), rng.uniform(-0.5, 0.5, size=2)
    w, h = min(round((x1 - x0) * scale), width), min(round((y1 - y0) * scale), height)
    cx, cy = (x0 + x1) / 2 + dx * width / NUM_CUT, (y0 + y1) / 2 + dy * height / NUM_CUT
    left, top = min(max(round(cx - w / 2), 0), width - w), min(max(round(cy - h / 2), 0), height - h)
    return labelled_view(image, objects, (left, top, left + w, top + h), max_pixels)


_block_scene = lru_cache(maxsize=4)(block_scene)


def view_labels(
    objects: Sequence[SceneObject], view: Box, grid_thw: Sequence[int], *, global_view: bool,
    glyphs: bool | None = None,
) -> torch.Tensor:
    """(rows * cols, len(COLUMNS)) labels of the merged tokens (row-major) of the image showing the
    pixel box ``view`` of a scene, patchified to ``grid_thw`` = (t, h, w) (merged: h/2 x w/2);
    ``glyphs``: whether the view is fine enough to label glyphs (default: crops only, not global
    views; a whole-image re-encoding at reading resolution labels them too)."""
    glyphs = not global_view if glyphs is None else glyphs
    rows, cols = int(grid_thw[1]) // 2, int(grid_thw[2]) // 2
    labels = torch.full((rows * cols, len(COLUMNS)), IGNORE, dtype=torch.long)
    labels[:, 0] = 0
    if global_view:
        labels[:, 1] = ((torch.arange(cols) + 0.5) * NUM_CUT / cols).long().repeat(rows)
        labels[:, 2] = ((torch.arange(rows) + 0.5) * NUM_CUT / rows).long().repeat_interleave(cols)
    for obj in objects:
        if (index := token_index(obj, view, grid_thw)) is not None:
            labels[index, 0] = 1 + NAMES.index((obj.colour, obj.shape))
            if glyphs:
                labels[index, 3] = GLYPHS.index(obj.glyph)
    return labels


def token_index(obj: SceneObject, view: Box, grid_thw: Sequence[int]) -> int | None:
    """The merged token (row-major) of the image showing ``view`` that holds ``obj``'s centre, or
    None when the centre lies outside ``view``."""
    rows, cols = int(grid_thw[1]) // 2, int(grid_thw[2]) // 2
    (cx, cy), (x0, y0, x1, y1) = obj.centre, view
    if not (x0 <= cx < x1 and y0 <= cy < y1):
        return None
    return int((cy - y0) * rows / (y1 - y0)) * cols + int((cx - x0) * cols / (x1 - x0))
