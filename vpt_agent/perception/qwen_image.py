"""Image tensors for the Qwen2-VL encoder, plus the resampling helpers the other branches share.

The released VPT models were trained with LLaMA-Factory's Qwen2-VL plugin, which regularizes every
image (original, crops, and the DINOv2 / SAM inputs alike) with PIL ``NEAREST`` resizes before any
processor sees it. :func:`resize_for_qwen` reproduces that rule on tensors, pixel for pixel.
"""
from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial
from itertools import accumulate
from typing import Literal

import numpy as np
import torch
from PIL import Image
from transformers import Qwen2VLImageProcessor
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from ..errors import BadImageError

QWEN_MAX_SIDE = 512
QWEN_MIN_SIDE = 28
QWEN_MAX_RATIO = 180
# Qwen2-VL's smart_resize refuses aspect ratios above 200; the plugin only clamps beyond that.
_RATIO_LIMIT = 200
_MERGE_TOKENS = 4  # 2x2 spatial merge


def check_image(image: object) -> torch.Tensor:
    """Return ``image`` if it is a uint8 tensor of shape (3, H, W) with H, W >= 1, else raise."""
    if not isinstance(image, torch.Tensor):
        raise BadImageError(f"expected a torch.Tensor image, got {type(image).__name__}")
    if image.dtype != torch.uint8:
        raise BadImageError(f"expected a uint8 image, got dtype {image.dtype}")
    if image.ndim != 3 or image.shape[0] != 3 or image.shape[1] < 1 or image.shape[2] < 1:
        raise BadImageError(f"expected an image of shape (3, H, W), got {tuple(image.shape)}")
    return image


def _nearest_index(n_in: int, n_out: int, device: torch.device) -> torch.Tensor:
    """Source indices PIL's NEAREST resize reads, including its running float64 sum of steps."""
    step = n_in / n_out
    positions = accumulate([step] * (n_out - 1), initial=step * 0.5)
    return torch.tensor([min(int(p), n_in - 1) for p in positions], dtype=torch.long, device=device)


def resize_for_qwen(
    image: torch.Tensor,
    max_side: int = QWEN_MAX_SIDE,
    min_side: int = QWEN_MIN_SIDE,
    max_ratio: int = QWEN_MAX_RATIO,
) -> torch.Tensor:
    """Regularize an image as the reference data pipeline does, on the image's device (on the CPU
    with numpy, whose gathers run without torch's thread pool).

    1. If the longer side exceeds ``max_side``, scale both sides by ``max_side / longer`` and
       truncate with ``int()``.
    2. Each side shorter than ``min_side`` is stretched to ``min_side`` (the other side is kept).
    3. If an aspect ratio exceeds 200 (Qwen2-VL's limit), the long side becomes ``max_ratio`` times
       the short one.

    Every step is a PIL ``NEAREST`` resize (reproduced exactly, so no new pixel values appear).
    Unlike the reference, which crashes there, a side truncated to 0 in step 1 is kept at 1 px.
    """
    check_image(image)
    height, width = image.shape[1:]
    rows = cols = None
    for new_width, new_height in _regularizing_steps(height, width, max_side, min_side, max_ratio):
        if rows is None:
            rows = torch.arange(height, device=image.device)
            cols = torch.arange(width, device=image.device)
        rows = rows[_nearest_index(height, new_height, image.device)]
        cols = cols[_nearest_index(width, new_width, image.device)]
        width, height = new_width, new_height
    if rows is None:
        return image
    if image.device.type == "cpu":  # gathered into (H, W, C) memory, the layout PIL reads without a copy
        hwc = np.take(np.take(image.permute(1, 2, 0).numpy(), rows.numpy(), axis=0), cols.numpy(), axis=1)
        return torch.from_numpy(hwc).permute(2, 0, 1)
    return image.index_select(1, rows).index_select(2, cols)


def _regularizing_steps(
    height: int, width: int, max_side: int = QWEN_MAX_SIDE, min_side: int = QWEN_MIN_SIDE,
    max_ratio: int = QWEN_MAX_RATIO,
) -> list[tuple[int, int]]:
    """The (width, height) after each NEAREST resize of :func:`resize_for_qwen`, from the sizes alone."""
    steps = []
    if max(width, height) > max_side:
        factor = max_side / max(width, height)
        steps.append((max(1, int(width * factor)), max(1, int(height * factor))))
        width, height = steps[-1]
    if min(width, height) < min_side:
        steps.append((max(width, min_side), max(height, min_side)))
        width, height = steps[-1]
    if width / height > _RATIO_LIMIT:
        steps.append((height * max_ratio, height))
        width, height = steps[-1]
    if height / width > _RATIO_LIMIT:
        steps.append((width, width * max_ratio))
    return steps


_PRECISION_BITS = 22  # PIL's fixed-point precision for 8-bit resampling
_FILTER_SUPPORT = {"bilinear": 1.0, "bicubic": 2.0}


def _pil_filter(x: torch.Tensor, mode: str) -> torch.Tensor:
    """PIL's bilinear / bicubic (a = -0.5) kernels, with its operation order."""
    x = x.abs()
    if mode == "bilinear":
        return torch.where(x < 1.0, 1.0 - x, 0.0)
    near = ((-0.5 + 2.0) * x - (-0.5 + 3.0)) * x * x + 1
    far = (((x - 5) * x + 8) * x - 4) * -0.5
    return torch.where(x < 1.0, near, torch.where(x < 2.0, far, 0.0))


@lru_cache(maxsize=4096)
def _pil_coefficients(
    n_in: int, n_out: int, mode: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """PIL's per-output first source index (n_out,) and int32 fixed-point weights (n_out, taps, 1),
    cached (read-only): training views repeat a few hundred sizes."""
    scale = n_in / n_out
    filter_scale = max(scale, 1.0)
    inverse_scale = 1.0 / filter_scale
    support = _FILTER_SUPPORT[mode] * filter_scale
    taps = math.ceil(support) * 2 + 1
    center = (torch.arange(n_out, dtype=torch.float64, device=device) + 0.5) * scale
    first = (center - support + 0.5).trunc().clamp(min=0)
    count = (center + support + 0.5).trunc().clamp(max=n_in) - first
    weights = []
    total = torch.zeros(n_out, dtype=torch.float64, device=device)
    for tap in range(taps):
        w = _pil_filter((tap + first - center + 0.5) * inverse_scale, mode)
        w = torch.where(tap < count, w, 0.0)
        total = total + w  # accumulated tap by tap, like PIL
        weights.append(w)
    weights = torch.stack(weights, dim=1) / torch.where(total != 0, total, 1.0)[:, None]
    fixed = weights * (1 << _PRECISION_BITS)
    fixed = torch.where(fixed < 0, (fixed - 0.5).trunc(), (fixed + 0.5).trunc())
    return first.long(), fixed.to(torch.int32)[:, :, None]


def _pil_pass(image: torch.Tensor, n_out: int, mode: str) -> torch.Tensor:
    """One PIL resampling pass along the rows (dim 1) of a contiguous int32 (C, H, W) image.

    Integer arithmetic as in PIL: sums of fixed-point weight * pixel fit in int32 by design.
    Gathering whole rows keeps every step a contiguous copy.
    """
    n_in = image.shape[1]
    first, fixed = _pil_coefficients(n_in, n_out, mode, image.device)
    shape = (image.shape[0], n_out, image.shape[2])
    total = torch.full(shape, 1 << (_PRECISION_BITS - 1), dtype=torch.int32, device=image.device)
    gathered = torch.empty_like(total)
    for tap in range(fixed.shape[1]):
        torch.index_select(image, 1, (first + tap).clamp(max=n_in - 1), out=gathered)
        total.add_(gathered.mul_(fixed[:, tap]))
    return total.bitwise_right_shift_(_PRECISION_BITS).clamp_(0, 255)


def resize_like_pil(
    image: torch.Tensor, size: tuple[int, int], mode: Literal["bilinear", "bicubic"]
) -> torch.Tensor:
    """Resize a uint8 (3, H, W) image to ``size`` = (height, width) exactly as Pillow <= 12 does.

    Pillow's 8-bit ``Image.resize`` with BILINEAR / BICUBIC: antialiasing support, fixed-point
    weights and int32 sums, the horizontal pass first, the intermediate rounded to uint8. Pillow
    <= 12 (the reference used 11.0) always runs the horizontal pass first; Pillow 13 sometimes runs
    the vertical pass first when both sides change (then some pixels differ by one level), so the
    passes are run one axis at a time: by Pillow itself on the CPU, by :func:`resample_like_pil`
    (the same arithmetic in torch) on other devices.
    """
    check_image(image)
    if len(size) != 2 or min(size) < 1:
        raise BadImageError(f"cannot resize to {size!r}")
    if image.device.type != "cpu":
        return resample_like_pil(image, size, mode)
    resample = Image.Resampling.BILINEAR if mode == "bilinear" else Image.Resampling.BICUBIC
    out = Image.fromarray(image.permute(1, 2, 0).numpy())
    if size[1] != out.width:
        out = out.resize((size[1], out.height), resample)
    if size[0] != out.height:
        out = out.resize((out.width, size[0]), resample)
    return torch.from_numpy(np.asarray(out).transpose(2, 0, 1).copy())


def resample_like_pil(
    image: torch.Tensor, size: tuple[int, int], mode: Literal["bilinear", "bicubic"]
) -> torch.Tensor:
    """:func:`resize_like_pil` in torch, on the image's device: bit-identical to Pillow's two passes."""
    height, width = image.shape[1:]
    out = image.to(torch.int32)
    if size[1] != width:
        out = _pil_pass(out.transpose(1, 2).contiguous(), size[1], mode).transpose(1, 2)
    if size[0] != height:
        out = _pil_pass(out.contiguous(), size[0], mode)
    return out.to(torch.uint8)


@lru_cache(maxsize=1)
def _default_processor() -> Qwen2VLImageProcessor:
    return Qwen2VLImageProcessor()


def qwen_pixel_values(
    images: list[torch.Tensor], image_processor=None, *, max_pixels: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen2-VL ``pixel_values`` (P, 1176) and ``image_grid_thw`` (n, 3) for uint8 (3, H, W) images:
    :func:`qwen_resize` each, then :func:`qwen_patches`. Results are on the images' device."""
    if not images:
        raise BadImageError("no images given")
    device = check_image(images[0]).device
    if any(check_image(image).device != device for image in images):
        raise BadImageError("all images must be on the same device")
    resize = partial(qwen_resize, image_processor=image_processor, max_pixels=max_pixels)
    many_on_cpu = len(images) > 1 and device.type == "cpu"  # Pillow resamples without the GIL: use every core
    return qwen_patches(list((_resizers().map if many_on_cpu else map)(resize, images)), image_processor)


@lru_cache(maxsize=1)
def _resizers() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=os.cpu_count() or 1, thread_name_prefix="vpt-resize")


def qwen_resize(image: torch.Tensor, image_processor=None, *, max_pixels: int | None = None) -> torch.Tensor:
    """An image as the Qwen2-VL encoder takes it: :func:`resize_for_qwen`, then to :func:`qwen_size`
    as a PIL bicubic resize (:func:`resize_like_pil`, as the reference's PIL-based processor did)."""
    size = qwen_size(image.shape[1], image.shape[2], image_processor, max_pixels=max_pixels)
    return resize_like_pil(resize_for_qwen(image), size, "bicubic")


def qwen_size(height: int, width: int, image_processor=None, *, max_pixels: int | None = None) -> tuple[int, int]:
    """(height, width) of :func:`qwen_resize`'s output for a height x width image, from the sizes alone:
    the regularized size, then Qwen2-VL's ``smart_resize`` (sides to multiples of patch * merge = 28
    within the processor's pixel budget). ``max_pixels`` (a model's ``config.image_max_pixels``)
    lowers the budget of ``image_processor`` (default: transformers' ``Qwen2VLImageProcessor``)."""
    processor = image_processor if image_processor is not None else _default_processor()
    for width, height in _regularizing_steps(height, width):
        pass
    return smart_resize(
        height,
        width,
        factor=processor.patch_size * processor.merge_size,
        min_pixels=processor.size["shortest_edge"],
        max_pixels=processor.size["longest_edge"] if max_pixels is None else max_pixels,
    )


def qwen_patches(resized: list[torch.Tensor], image_processor=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``pixel_values`` (P, 1176) float32 and ``image_grid_thw`` (n, 3) of :func:`qwen_resize` outputs:
    ``image_processor``'s rescaling, OpenAI-CLIP normalization and patchifying (patch 14, temporal
    patch 2, 2x2 merge), for all images in one call."""
    processor = image_processor if image_processor is not None else _default_processor()
    device = resized[0].device
    out = processor(images=resized, do_resize=False, return_tensors="pt", input_data_format="channels_first")
    return out["pixel_values"].to(device=device, dtype=torch.float32), out["image_grid_thw"].to(device, torch.long)


def qwen_grid(size: tuple[int, int], image_processor=None) -> torch.Tensor:
    """(3,) ``image_grid_thw`` of an image of :func:`qwen_size` ``size``."""
    processor = image_processor if image_processor is not None else _default_processor()
    return torch.tensor([1, size[0] // processor.patch_size, size[1] // processor.patch_size])


def num_image_tokens(grid_thw: torch.Tensor) -> int:
    """Number of merged image tokens for a (3,) or (n, 3) ``image_grid_thw``: sum of t*h*w / 4."""
    grid = torch.as_tensor(grid_thw).reshape(-1, 3)
    return int(grid.prod(dim=-1).sum().item()) // _MERGE_TOKENS
