"""`looks_synthetic`: the generator's scenes (every family, many seeds, block scenes, the shipped
example) pass; photo-like images, a resized scene and a JPEG of a scene do not."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from vpt_agent.data.synthetic import COLOURS, FAMILIES, block_scene, looks_synthetic, make_item
from vpt_agent.example import EXAMPLE_IMAGE
from vpt_agent.images import read_image_file


def _hwc(tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()


@pytest.mark.parametrize("family", FAMILIES)
def test_every_scene_of_the_generator_looks_synthetic(family):
    for seed in (0, 1, 7, 1000, 12345):
        for index in range(6):
            item = make_item(seed, index, (family,))
            assert looks_synthetic(_hwc(item.image)), (seed, index, item.size)


def test_block_scenes_and_the_shipped_example_look_synthetic():
    assert all(looks_synthetic(_hwc(block_scene(3, index)[0])) for index in range(10))
    assert looks_synthetic(read_image_file(EXAMPLE_IMAGE))


def _smooth_noise(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    coarse = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
    return np.asarray(Image.fromarray(coarse).resize((width, height), Image.BICUBIC))


def _noisy(rng: np.random.Generator, image: np.ndarray, sigma: float) -> np.ndarray:
    return np.clip(image + rng.normal(0, sigma, image.shape), 0, 255).astype(np.uint8)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _photo_like() -> dict[str, np.ndarray]:
    """Images of a size the generator draws (so that the colours decide), but not drawn by it."""
    rng = np.random.default_rng(0)
    gradient = np.linspace(0, 255, 720)[None, :, None] * np.array([0.9, 0.5, 0.2]) + np.zeros((700, 1, 3))
    red = np.full((600, 800, 3), COLOURS["red"], dtype=np.float64)  # a flat, saturated surface, camera noise
    scene = _hwc(make_item(0, 0).image)
    return {
        "smooth noise": _smooth_noise(rng, 800, 600),
        "smooth noise with grain": _noisy(rng, _smooth_noise(rng, 640, 640), 3),
        "gradient with noise": _noisy(rng, gradient, 4),
        "flat red with noise": _noisy(rng, red, 1.5),
        "white noise": rng.integers(0, 256, (760, 700, 3), dtype=np.uint8),
        "a JPEG of a scene": _jpeg(scene, 95),
        "a scene resized": np.asarray(Image.fromarray(scene).resize((224, 224), Image.BILINEAR)),
        "a scene cropped to a small photo size": scene[:300, :400],
    }


@pytest.mark.parametrize("name", list(_photo_like()))
def test_other_images_do_not(name):
    assert not looks_synthetic(_photo_like()[name])
