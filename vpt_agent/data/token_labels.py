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
* ``glyph``: the index in `GLYPHS` of the centred object's glyph (crop views only: unreadable in
  the global view), else `IGNORE`.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch

from ..tokens import NUM_CUT, Box
from .synthetic import COLOURS, GLYPHS, SHAPES, SceneObject

IGNORE = -100
"""The label no loss is computed on (`torch.nn.functional.cross_entropy`'s ignore_index)."""
NAMES: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLOURS for s in SHAPES)
COLUMNS: dict[str, int] = {"name": 1 + len(NAMES), "x": NUM_CUT, "y": NUM_CUT, "glyph": len(GLYPHS)}
"""Label column -> number of classes."""


def view_labels(
    objects: Sequence[SceneObject], view: Box, grid_thw: Sequence[int], *, global_view: bool
) -> torch.Tensor:
    """(rows * cols, len(COLUMNS)) labels of the merged tokens (row-major) of the image showing the
    pixel box ``view`` of a scene, patchified to ``grid_thw`` = (t, h, w) (merged: h/2 x w/2)."""
    rows, cols = int(grid_thw[1]) // 2, int(grid_thw[2]) // 2
    labels = torch.full((rows * cols, len(COLUMNS)), IGNORE, dtype=torch.long)
    labels[:, 0] = 0
    if global_view:
        labels[:, 1] = ((torch.arange(cols) + 0.5) * NUM_CUT / cols).long().repeat(rows)
        labels[:, 2] = ((torch.arange(rows) + 0.5) * NUM_CUT / rows).long().repeat_interleave(cols)
    for obj in objects:
        if (index := token_index(obj, view, grid_thw)) is not None:
            labels[index, 0] = 1 + NAMES.index((obj.colour, obj.shape))
            if not global_view:
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
