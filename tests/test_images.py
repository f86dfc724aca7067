"""Input normalization: every accepted image type, mode conversions, and every rejection."""
from __future__ import annotations

import base64
import io
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from vpt_agent.errors import BadImageError, BadQuestionError
from vpt_agent.images import image_key, load_image, to_png, validate_question


def _pixels(h: int = 5, w: int = 7) -> np.ndarray:
    return np.arange(h * w * 3, dtype=np.uint8).reshape(h, w, 3)


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _chw(hwc: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(hwc).permute(2, 0, 1)


def test_every_input_type_gives_the_same_tensor(tmp_path):
    hwc = _pixels()
    png = _encode(Image.fromarray(hwc))
    (tmp_path / "a.png").write_bytes(png)
    inputs = [
        str(tmp_path / "a.png"),
        tmp_path / "a.png",
        png,
        bytearray(png),
        "data:image/png;base64," + base64.b64encode(png).decode(),
        Image.fromarray(hwc),
        hwc,
        _chw(hwc),
        _chw(hwc).float() / 255,
    ]
    for obj in inputs:
        out = load_image(obj)
        assert out.dtype == torch.uint8 and out.shape == (3, 5, 7) and out.permute(1, 2, 0).is_contiguous(), type(obj)
        assert torch.equal(out, _chw(hwc)), type(obj)


def test_the_input_array_is_copied():
    hwc = _pixels(1, 1)
    out = load_image(hwc)
    out[:] = 0
    assert hwc.any()


def test_gray_inputs_become_rgb():
    gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
    expected = torch.from_numpy(gray)[None].expand(3, -1, -1)
    assert torch.equal(load_image(gray), expected)
    assert torch.equal(load_image(gray[:, :, None]), expected)
    assert torch.equal(load_image(torch.from_numpy(gray)[None]), expected)
    assert torch.equal(load_image(Image.fromarray(gray, "L")), expected)


def test_alpha_is_composited_over_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[..., 0] = 200
    rgba[..., 3] = [[255, 0], [128, 64]]
    out = load_image(rgba).permute(1, 2, 0).numpy()
    assert out[0, 0].tolist() == [200, 0, 0]  # opaque
    assert out[0, 1].tolist() == [255, 255, 255]  # fully transparent
    assert out[1, 0].tolist() == [227, 127, 127]  # half: (200·128 + 255·127) / 255
    assert torch.equal(load_image(Image.fromarray(rgba, "RGBA")), load_image(rgba))
    assert torch.equal(load_image(torch.from_numpy(rgba).permute(2, 0, 1)), load_image(rgba))
    la = Image.fromarray(rgba[..., [0, 3]], "LA")
    assert load_image(la).permute(1, 2, 0).numpy()[0, 1].tolist() == [255, 255, 255]


def test_palette_with_transparency():
    image = Image.new("P", (2, 1))
    image.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)
    image.putpixel((1, 0), 1)
    image.info["transparency"] = 1
    out = load_image(_encode(image)).permute(1, 2, 0).numpy()
    assert out[0, 0].tolist() == [255, 0, 0] and out[0, 1].tolist() == [255, 255, 255]


def test_cmyk_16bit_and_float_modes():
    cmyk = Image.new("CMYK", (3, 2), (0, 255, 255, 0))  # red
    assert load_image(cmyk).permute(1, 2, 0).numpy()[0, 0].tolist() == [255, 0, 0]

    wide = np.array([[0, 257 * 100, 65535]], dtype=np.uint16)
    img16 = Image.fromarray(wide)
    assert img16.mode == "I;16"
    assert load_image(img16)[0].tolist() == [[0, 100, 255]]
    assert load_image(_encode(img16))[0].tolist() == [[0, 100, 255]]  # 16-bit PNG opens as I / I;16

    unit = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    assert load_image(unit)[0].tolist() == [[0, 128, 255]]
    big = Image.fromarray(np.array([[-5.0, 100.0, 300.0]], dtype=np.float32))
    assert load_image(big)[0].tolist() == [[0, 100, 255]]


def test_exif_orientation_is_applied():
    hwc = _pixels(2, 3)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise to display
    data = _encode(Image.fromarray(hwc), exif=exif)
    out = load_image(data).permute(1, 2, 0).numpy()
    assert out.shape == (3, 2, 3)
    assert np.array_equal(out, np.rot90(hwc, k=-1))


def test_animated_image_gives_first_frame():
    frames = [Image.new("RGB", (4, 4), color) for color in ((255, 0, 0), (0, 0, 255))]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=10, loop=0)
    gif = Image.open(io.BytesIO(buffer.getvalue()))
    gif.seek(1)
    for obj in (buffer.getvalue(), gif):
        assert load_image(obj).permute(1, 2, 0).numpy()[0, 0].tolist() == [255, 0, 0]


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares a size but holds (almost) no pixel data."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", zlib.compress(b"\0" * 16))


def test_decompression_bomb_rejected_from_declared_size():
    with pytest.raises(BadImageError, match="decompression bomb|limit"):
        load_image(_png_header_only(30_000, 30_000), max_side=100_000)
    with pytest.raises(BadImageError, match="limit is 1000000"):  # checked before decoding the (absent) data
        load_image(_png_header_only(2_000, 2_000), max_pixels=1_000_000)
    with pytest.raises(BadImageError, match="longest side"):
        load_image(_png_header_only(30_000, 10))
    with pytest.raises(BadImageError, match="limit is 100"):
        load_image(np.zeros((11, 10, 3), np.uint8), max_pixels=100)


@pytest.mark.parametrize(
    "obj, message",
    [
        (b"", "empty"),
        (b"not an image at all", "not a readable image"),
        (_encode(Image.new("RGB", (64, 64), (1, 2, 3)))[:60], "decode|readable"),
        ("data:image/png;base64,@@@", "base64"),
        ("data:image/png,abc", "base64"),
        (np.zeros((0, 5, 3), np.uint8), "empty"),
        (np.zeros((4, 5, 3), np.float32), "uint8"),
        (np.zeros((4, 5, 2), np.uint8), "shape"),
        (np.zeros((2, 4, 5, 3), np.uint8), "shape"),
        (torch.zeros(3, 0, 4, dtype=torch.uint8), "empty"),
        (torch.zeros(2, 4, 5, dtype=torch.uint8), "shape"),
        (torch.zeros(3, 4, 5, dtype=torch.int64), "uint8 or float"),
        (torch.full((3, 4, 5), 2.0), r"\[0, 1\]"),
        (torch.full((3, 4, 5), float("nan")), r"\[0, 1\]"),
        (Image.new("RGB", (0, 0)), "empty"),
        (12, "unsupported image type int"),
        (None, "unsupported image type NoneType"),
        ([[1, 2]], "unsupported image type list"),
    ],
)
def test_rejections(obj, message):
    with pytest.raises(BadImageError, match=message):
        load_image(obj)


def test_bad_paths(tmp_path):
    with pytest.raises(BadImageError, match="no such image file"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(BadImageError, match="directory"):
        load_image(str(tmp_path))
    (tmp_path / "text.png").write_text("hello")
    with pytest.raises(BadImageError, match="not a readable image"):
        load_image(tmp_path / "text.png")


@settings(max_examples=25, deadline=None)
@given(st.integers(1, 9), st.integers(1, 9), st.integers(0, 2**32 - 1))
def test_png_round_trip_and_key(h, w, seed):
    image = torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (3, h, w), dtype=np.uint8))
    again = load_image(to_png(image))
    assert torch.equal(again, image)
    assert image_key(again) == image_key(image)
    assert image_key(image.transpose(1, 2).contiguous()) != image_key(image) or h == w == 1 or torch.equal(
        image.transpose(1, 2), image
    )


def test_validate_question():
    assert validate_question("  What is it?\n") == "What is it?"
    for bad, message in [(None, "string"), (3, "string"), ("", "empty"), (" \n\t", "empty")]:
        with pytest.raises(BadQuestionError, match=message):
            validate_question(bad)
    with pytest.raises(BadQuestionError, match="limit is 10"):
        validate_question("x" * 11, max_chars=10)
