"""Region crops on image tensors (no PIL), on the image's device."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from numbers import Integral

import torch

from ..errors import BadImageError, InputMismatchError


def crop(image: torch.Tensor, box: Sequence[int]) -> torch.Tensor:
    """The region ``box`` = (x0, y0, x1, y1) of a (C, H, W) image: ``image[:, y0:y1, x0:x1]``.

    Same pixels as ``PIL.Image.crop(box)``, but the box must lie inside the image and be
    non-empty (InputMismatchError otherwise). Returns a view of ``image``.
    """
    if not isinstance(image, torch.Tensor) or image.ndim != 3:
        raise BadImageError("expected an image tensor of shape (C, H, W)")
    if len(box) != 4 or not all(isinstance(v, Integral) and not isinstance(v, bool) for v in box):
        raise InputMismatchError(f"a box is four ints (x0, y0, x1, y1), got {box!r}")
    x0, y0, x1, y1 = (int(v) for v in box)
    height, width = image.shape[1:]
    if not (0 <= x0 < x1 <= width and 0 <= y0 < y1 <= height):
        raise InputMismatchError(f"box {box!r} is empty or not inside a {width}x{height} image")
    return image[:, y0:y1, x0:x1]


def crops(image: torch.Tensor, boxes: Iterable[Sequence[int]]) -> list[torch.Tensor]:
    """:func:`crop` for each box, in order."""
    return [crop(image, box) for box in boxes]
