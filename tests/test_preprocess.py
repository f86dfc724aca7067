"""Image preprocessing (Qwen2-VL, DINOv2, SAM) and region crops, against PIL and transformers."""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from transformers import Qwen2VLImageProcessor
from transformers.image_utils import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil
from transformers.models.sam.image_processing_pil_sam import SamImageProcessorPil

from vpt_agent.errors import BadImageError, InputMismatchError
from vpt_agent.perception.crop import crop, crops
from vpt_agent.perception.dino import preprocess_dino
from vpt_agent.perception.qwen_image import (
    num_image_tokens,
    qwen_pixel_values,
    resize_for_qwen,
    resample_like_pil,
    resize_like_pil,
)
from vpt_agent.perception.sam import preprocess_sam

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
REGION_CASES = json.loads((FIXTURES / "region_cases.json").read_text())


@lru_cache(maxsize=None)
def _image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    """A seeded uint8 (3, H, W) picture: smooth colour fields plus noise (shared: do not modify)."""
    generator = torch.Generator().manual_seed(seed)
    coarse = torch.rand(1, 3, height // 16 + 2, width // 16 + 2, generator=generator) * 255
    smooth = F.interpolate(coarse, size=(height, width), mode="bilinear")[0]
    noisy = smooth + torch.randn(3, height, width, generator=generator) * 12
    return noisy.round().clamp(0, 255).to(torch.uint8)


def _to_pil(image: torch.Tensor) -> Image.Image:
    return Image.fromarray(image.permute(1, 2, 0).numpy())


def _from_pil(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.array(image)).permute(2, 0, 1)


def _pil_regularize(image: Image.Image, max_side: int) -> Image.Image:
    """The reference's image regularization, written against PIL (NEAREST resizes)."""
    width, height = image.size
    if max(width, height) > max_side:
        factor = max_side / max(width, height)
        # the reference has no max(1, .): PIL refuses a 0-pixel side there
        image = image.resize((max(1, int(width * factor)), max(1, int(height * factor))), Image.NEAREST)
    width, height = image.size
    if min(width, height) < 28:
        image = image.resize((max(width, 28), max(height, 28)), Image.NEAREST)
    width, height = image.size
    if width / height > 200:
        image = image.resize((height * 180, height), Image.NEAREST)
    width, height = image.size
    if height / width > 200:
        image = image.resize((width, width * 180), Image.NEAREST)
    return image


# ---------------------------------------------------------------- regularization (NEAREST)

SIZES_WH = [
    (37, 211), (211, 37), (1, 1), (1, 300), (300, 1), (1, 5000), (5000, 1), (3000, 20),
    (20, 3000), (640, 480), (1000, 1000), (512, 512), (513, 100), (27, 27), (28, 28), (1500, 600),
]


@pytest.mark.parametrize(("width", "height"), SIZES_WH)
def test_resize_for_qwen_is_pixel_exact(width: int, height: int) -> None:
    image = _image(height, width)
    expected = _from_pil(_pil_regularize(_to_pil(image), 512))
    out = resize_for_qwen(image)
    assert out.dtype == torch.uint8 and out.device == image.device
    assert torch.equal(out, expected)
    assert max(out.shape[1:]) <= 512 and min(out.shape[1:]) >= 28


def test_resize_for_qwen_sizes() -> None:
    assert resize_for_qwen(_image(211, 37)).shape == (3, 211, 37)  # untouched
    assert resize_for_qwen(_image(20, 3000)).shape == (3, 28, 512)  # 512x3, then short side 28
    assert resize_for_qwen(_image(5000, 1)).shape == (3, 512, 28)  # width 0 kept at 1, then 28
    assert resize_for_qwen(_image(480, 640)).shape == (3, 384, 512)


def test_resize_for_qwen_clamps_aspect_ratio() -> None:
    # With max_side 512 and min_side 28 the ratio stays <= 512/28 and never needs clamping
    # (3000x20 ends as 512x28); a larger max_side exercises the 1:180 clamp.
    for height, width, expected in [(8000, 30, (3, 5400, 30)), (30, 8000, (3, 30, 5400))]:
        image = _image(height, width)
        out = resize_for_qwen(image, max_side=100_000)
        assert out.shape == expected
        assert torch.equal(out, _from_pil(_pil_regularize(_to_pil(image), 100_000)))


def test_resize_for_qwen_returns_small_images_as_is() -> None:
    image = _image(100, 200)
    assert resize_for_qwen(image) is image


@pytest.mark.parametrize(
    "bad",
    [
        "not an image",
        torch.zeros(3, 10, 10),
        torch.zeros(4, 10, 10, dtype=torch.uint8),
        torch.zeros(10, 10, dtype=torch.uint8),
        torch.zeros(3, 0, 10, dtype=torch.uint8),
    ],
)
def test_bad_images_are_rejected(bad: object) -> None:
    for function in (resize_for_qwen, preprocess_dino, preprocess_sam):
        with pytest.raises(BadImageError):
            function(bad)
    with pytest.raises(BadImageError):
        qwen_pixel_values([bad])


# ---------------------------------------------------------------- PIL bilinear / bicubic


@pytest.mark.parametrize("mode", ["bilinear", "bicubic"])
@pytest.mark.parametrize(
    ("height", "width", "new_height", "new_width"),
    [
        (480, 640, 256, 341), (211, 37, 1214, 213), (100, 100, 200, 50), (100, 100, 50, 200),
        (37, 211, 37, 400), (300, 200, 150, 200), (7, 500, 1, 3), (640, 480, 1024, 768),
    ],
)
def test_resize_like_pil_is_pixel_exact(mode: str, height: int, width: int, new_height: int, new_width: int) -> None:
    image = _image(height, width)
    resample = {"bilinear": Image.BILINEAR, "bicubic": Image.BICUBIC}[mode]
    # Two explicit passes (horizontal, then vertical) are what Pillow <= 12 always does; Pillow 13
    # picks the vertical pass first for some shapes (there it differs by <= 1 level).
    expected = _to_pil(image).resize((new_width, height), resample).resize((new_width, new_height), resample)
    assert torch.equal(resize_like_pil(image, (new_height, new_width), mode), _from_pil(expected))
    # the torch arithmetic that runs on other devices, here on the CPU
    assert torch.equal(resample_like_pil(image, (new_height, new_width), mode), _from_pil(expected))


# ---------------------------------------------------------------- Qwen2-VL pixel values


@pytest.mark.parametrize(
    ("height", "width", "grid"),
    [
        (211, 37, [1, 16, 2]),
        (37, 211, [1, 2, 16]),
        (1, 1, [1, 4, 4]),  # 28x28, then smart_resize up to the 56x56 minimum
        (1, 300, [1, 2, 22]),
        (20, 3000, [1, 2, 36]),
        (480, 640, [1, 28, 36]),
        (1000, 1000, [1, 36, 36]),
    ],
)
def test_qwen_pixel_values(height: int, width: int, grid: list[int]) -> None:
    image = _image(height, width)
    pixel_values, grid_thw = qwen_pixel_values([image])
    assert grid_thw.tolist() == [grid] and grid_thw.dtype == torch.long
    rows = grid[0] * grid[1] * grid[2]
    assert pixel_values.shape == (rows, 1176) and pixel_values.dtype == torch.float32
    assert num_image_tokens(grid_thw) == rows // 4

    # The transformers processor called directly on the resized image gives the same values.
    resized = resize_like_pil(resize_for_qwen(image), (grid[1] * 14, grid[2] * 14), "bicubic")
    direct = Qwen2VLImageProcessor()(images=[resized], return_tensors="pt")
    assert torch.equal(pixel_values, direct["pixel_values"])
    assert torch.equal(grid_thw, direct["image_grid_thw"])

    # The reference path: PIL bicubic resize (horizontal pass, then vertical, as Pillow <= 12
    # always does) and transformers' PIL-backend processor. Measured: max |diff| 2.4e-7.
    regularized = _to_pil(resize_for_qwen(image))
    target = (grid[2] * 14, grid[1] * 14)
    resized_pil = regularized.resize((target[0], regularized.height), Image.BICUBIC).resize(target, Image.BICUBIC)
    reference = Qwen2VLImageProcessorPil()(images=resized_pil, do_resize=False, return_tensors="pt")
    torch.testing.assert_close(pixel_values, reference["pixel_values"], rtol=0, atol=1e-6)
    # The PIL-backend processor doing its own resize picks the same grid. (With Pillow 13 its
    # values match too, except where Pillow 13 runs the vertical pass first, e.g. 37x211 here:
    # then up to 4 uint8 levels differ on ~25 % of values.)
    assert Qwen2VLImageProcessorPil()(images=regularized)["image_grid_thw"].tolist() == [grid]


def test_qwen_pixel_values_batches_in_order() -> None:
    images = [_image(211, 37, seed=1), _image(480, 640, seed=2), _image(60, 60, seed=3)]
    pixel_values, grid_thw = qwen_pixel_values(images)
    singles = [qwen_pixel_values([image]) for image in images]
    assert torch.equal(pixel_values, torch.cat([values for values, _ in singles]))
    assert torch.equal(grid_thw, torch.cat([grid for _, grid in singles]))
    assert num_image_tokens(grid_thw) == sum(num_image_tokens(grid) for _, grid in singles)


def test_qwen_pixel_values_needs_images() -> None:
    with pytest.raises(BadImageError):
        qwen_pixel_values([])


def test_num_image_tokens() -> None:
    assert num_image_tokens(torch.tensor([1, 4, 6])) == 6
    assert num_image_tokens(torch.tensor([[1, 4, 6], [1, 16, 2]])) == 14


# ---------------------------------------------------------------- DINOv2 / SAM inputs

DINO_PROCESSOR = BitImageProcessorPil(  # facebook/dinov2-{base,large} preprocessor_config.json
    size={"shortest_edge": 256},
    crop_size={"height": 224, "width": 224},
    resample=Image.BICUBIC,
    image_mean=IMAGENET_DEFAULT_MEAN,
    image_std=IMAGENET_DEFAULT_STD,
)


@pytest.mark.parametrize(("height", "width"), [(480, 640), (211, 37), (224, 224), (1000, 700), (2000, 300), (37, 211)])
def test_preprocess_dino(height: int, width: int) -> None:
    image = _image(height, width)
    pixels = preprocess_dino(image)
    assert pixels.shape == (3, 224, 224) and pixels.dtype == torch.float32
    # The reference ran the PIL processor after the NEAREST regularization to <= 512 px. After
    # it a downscale to shortest edge 256 has an aspect ratio < 2, where Pillow 13 also resizes
    # horizontally first: measured max |diff| 0.0.
    reference = DINO_PROCESSOR(images=_to_pil(resize_for_qwen(image, max_side=512)), return_tensors="pt")
    torch.testing.assert_close(pixels, reference["pixel_values"][0], rtol=0, atol=1e-6)


def test_preprocess_dino_skips_regularization_on_request() -> None:
    small, large = _image(300, 400), _image(900, 1200)
    assert torch.equal(preprocess_dino(small, max_side=None), preprocess_dino(small))
    assert not torch.equal(preprocess_dino(large, max_side=None), preprocess_dino(large))


@pytest.mark.parametrize(("height", "width"), [(480, 640), (211, 37), (2000, 900), (1024, 1024)])
def test_preprocess_sam(height: int, width: int) -> None:
    image = _image(height, width)
    pixels = preprocess_sam(image)
    assert pixels.shape == (3, 1024, 1024) and pixels.dtype == torch.float32
    regularized = resize_for_qwen(image, max_side=1024)
    scale = 1024 / max(regularized.shape[1:])
    valid_h, valid_w = (int(side * scale + 0.5) for side in regularized.shape[1:])
    assert torch.all(pixels[:, valid_h:] == 0) and torch.all(pixels[:, :, valid_w:] == 0)
    reference = SamImageProcessorPil()(images=_to_pil(regularized), return_tensors="pt")
    # Upscaling keeps Pillow 13 horizontal-first: measured max |diff| 0.0.
    torch.testing.assert_close(pixels, reference["pixel_values"][0], rtol=0, atol=1e-6)


# ---------------------------------------------------------------- crops


def _region_crops() -> list:
    found = []
    for case in REGION_CASES["cases"]:
        for size, per_size in case["per_image_size"].items():
            for i, region in enumerate(per_size.get("crops") or []):
                args = (size, region["bbox_int"], region["crop_size_wh"])
                found.append(pytest.param(*args, id=f"{case['id']}-{size}-{i}"))
    return found


@pytest.mark.parametrize(("size", "box", "crop_wh"), _region_crops())
def test_crop_matches_pil(size: str, box: list[int], crop_wh: list[int]) -> None:
    width, height = (int(v) for v in size.split("x"))
    image = _image(height, width)
    region = crop(image, tuple(box))
    assert tuple(region.shape) == (3, crop_wh[1], crop_wh[0])
    assert torch.equal(region, _from_pil(_to_pil(image).crop(tuple(box))))


def test_crops_keeps_order() -> None:
    image = _image(480, 640)
    boxes = [(0, 0, 10, 20), (600, 400, 640, 480)]
    assert [tuple(c.shape) for c in crops(image, boxes)] == [(3, 20, 10), (3, 80, 40)]


@pytest.mark.parametrize(
    "box",
    [(0, 0, 0, 10), (5, 5, 4, 10), (-1, 0, 10, 10), (0, 0, 641, 10), (0, 0, 10, 481), (0, 0, 10), (0, 0, 1.5, 10)],
)
def test_crop_rejects_bad_boxes(box: tuple) -> None:
    with pytest.raises(InputMismatchError):
        crop(_image(480, 640), box)
