"""Input normalization: any supported image object -> uint8 (3, H, W) RGB tensor; question checks.

Accepted images: a path (str or Path) or a ``data:`` URL, encoded bytes, a PIL image, a numpy
HWC (or HW gray) uint8 array, a torch CHW tensor (uint8, or float in [0, 1]). EXIF orientation is
applied, animated images give their first frame, transparency is composited over white, 16-bit
and float images are scaled to 8 bits. Anything unreadable raises `BadImageError` (naming the file
when given a path).

torch is imported only by the functions that make or take tensors: `read_image_file` and
`validate_question` check the CLI's input before the model (and torch) loads.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import os
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Union

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import BadImageError, BadQuestionError

if TYPE_CHECKING:
    import torch

MAX_PIXELS = 40_000_000
"""Largest accepted image (W·H); larger declared sizes are rejected before decoding."""
MAX_SIDE = 20_000
"""Longest accepted side in pixels."""
MAX_QUESTION_CHARS = 4_000

ImageInput = Union[str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray, "torch.Tensor"]

_ALPHA_MODES = {"RGBA", "RGBa", "LA", "La", "PA"}
_WIDE_GRAY_MODES = {"I", "I;16", "I;16L", "I;16B", "I;16N"}


def load_image(obj: ImageInput, *, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE) -> torch.Tensor:
    """Any supported image -> uint8 (3, H, W) RGB tensor on the CPU, a view of (H, W, 3) memory
    (the layout PIL and numpy read without a copy)."""
    import torch

    if isinstance(obj, torch.Tensor):
        obj = _tensor_array(obj)
    return torch.from_numpy(_own_copy(_pixels(obj, max_pixels, max_side))).permute(2, 0, 1)


def read_image_file(path: str | os.PathLike, *, max_pixels: int = MAX_PIXELS, max_side: int = MAX_SIDE
                    ) -> np.ndarray:
    """The pixels of an image file as an (H, W, 3) uint8 RGB array, fully decoded by `load_image`'s
    rules, without torch; a `BadImageError` names the file."""
    path = _existing_file(Path(path))
    try:
        return _decode(path, max_pixels, max_side)
    except BadImageError as exc:
        raise BadImageError(f"{path}: {exc}") from None


def validate_question(q: object, *, max_chars: int = MAX_QUESTION_CHARS, truncate: bool = False) -> str:
    """The question stripped of surrounding whitespace; `BadQuestionError` if unusable. A question
    longer than `max_chars` is rejected, or cut to its first `max_chars` characters if `truncate`."""
    if not isinstance(q, str):
        raise BadQuestionError(f"the question must be a string, got {type(q).__name__}")
    q = q.strip()
    if not q:
        raise BadQuestionError("the question is empty")
    if len(q) > max_chars:
        if not truncate:
            raise BadQuestionError(f"the question has {len(q)} characters; the limit is {max_chars}")
        q = q[:max_chars]
    try:
        q.encode("utf-8")
    except UnicodeEncodeError as exc:  # lone surrogates, e.g. from JSON "\ud800" escapes
        raise BadQuestionError(f"the question is not valid Unicode text (a lone surrogate at {exc.start})") from None
    return q


def to_png(image: torch.Tensor) -> bytes:
    """Lossless PNG bytes of a uint8 (3, H, W) image (fast compression)."""
    buffer = io.BytesIO()
    Image.fromarray(image.permute(1, 2, 0).cpu().numpy()).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def image_key(image: torch.Tensor) -> str:
    """Content hash of a uint8 (3, H, W) image: equal pixels, equal key."""
    digest = hashlib.sha256(str(tuple(image.shape)).encode())
    digest.update(image.cpu().permute(1, 2, 0).contiguous().numpy())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------ internals
def _pixels(obj: ImageInput, max_pixels: int, max_side: int) -> np.ndarray:
    """(H, W, 3) uint8 RGB array of any supported input but a tensor, its size checked."""
    if isinstance(obj, str) and obj.startswith("data:"):
        obj = _data_url_bytes(obj)
    if isinstance(obj, (str, os.PathLike)):
        return read_image_file(obj, max_pixels=max_pixels, max_side=max_side)
    if isinstance(obj, (bytes, bytearray, memoryview)):
        if not len(obj):
            raise BadImageError("the image bytes are empty")
        return _decode(io.BytesIO(bytes(obj)), max_pixels, max_side)
    if isinstance(obj, Image.Image):
        _check_size(*obj.size, max_pixels, max_side)
        return _from_pil(obj, max_pixels, max_side)
    if isinstance(obj, np.ndarray):
        return _from_array(obj, max_pixels, max_side)
    raise BadImageError(
        f"unsupported image type {type(obj).__name__}: expected a path, bytes, PIL.Image, "
        "numpy HWC uint8 array or CHW torch tensor"
    )


def _data_url_bytes(url: str) -> bytes:
    header, sep, payload = url.partition(",")
    if not sep or not header.endswith(";base64"):
        raise BadImageError("a data URL image must be base64 encoded (data:image/...;base64,...)")
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadImageError(f"the data URL is not valid base64: {exc}") from None


def _existing_file(path: Path) -> Path:
    try:
        path = path.expanduser()
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, RuntimeError) as exc:  # a name too long (base64 without "data:"?), an unknown ~user
        reason = getattr(exc, "strerror", None) or exc
        raise BadImageError(f"not a usable image path ({reason}): {str(path)[:80]!r}") from None
    if is_dir:
        raise BadImageError(f"{path} is a directory, not an image file")
    if not is_file:
        raise BadImageError(f"no such image file: {path}")
    return path


def _check_size(width: int, height: int, max_pixels: int, max_side: int) -> None:
    if width < 1 or height < 1:
        raise BadImageError(f"the image is empty ({width}x{height})")
    if max(width, height) > max_side:
        raise BadImageError(f"the image is {width}x{height}; the longest side may be at most {max_side} px")
    if width * height > max_pixels:
        raise BadImageError(
            f"the image is {width}x{height} = {width * height} pixels; the limit is {max_pixels} "
            "(possible decompression bomb)"
        )


def _decode(source: Path | io.BytesIO, max_pixels: int, max_side: int) -> np.ndarray:
    """Open lazily, check the declared size before any pixel is decoded, then decode."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            image = Image.open(source)
    except Image.DecompressionBombError as exc:
        raise BadImageError(f"decompression bomb: {exc}") from None
    except PermissionError:
        raise BadImageError("cannot read the file (permission denied)") from None
    except UnidentifiedImageError:
        raise BadImageError("not a readable image (unknown format or corrupt header)") from None
    except Exception as exc:  # PIL raises many types on foreign data (OSError, SyntaxError, ...)
        raise BadImageError(f"not a readable image ({exc})") from None
    with image:
        _check_size(*image.size, max_pixels, max_side)
        return _from_pil(image, max_pixels, max_side)


def _from_pil(image: Image.Image, max_pixels: int, max_side: int) -> np.ndarray:
    try:
        if image.tell():  # a multi-frame image left at a later frame (n_frames would scan the file)
            image.seek(0)
        image.load()
        image = ImageOps.exif_transpose(image)
        rgb = _pil_rgb_array(image)
    except BadImageError:
        raise
    except Exception as exc:  # truncated or corrupt data surfaces only when decoding
        raise BadImageError(f"cannot decode the image ({exc})") from None
    return _checked(rgb, max_pixels, max_side)


def _pil_rgb_array(image: Image.Image) -> np.ndarray:
    """HWC uint8 RGB array of a decoded PIL image of any mode."""
    mode = image.mode
    if mode == "RGB":
        return np.asarray(image)
    if mode in _WIDE_GRAY_MODES:  # 16/32-bit gray: 0..65535 -> 0..255
        gray = np.clip(np.asarray(image, dtype=np.float64), 0, 65535) / 257.0
        return _gray_to_rgb(np.round(gray).astype(np.uint8))
    if mode == "F":  # float gray: [0, 1] scaled, otherwise taken as 0..255
        with np.errstate(invalid="ignore"):  # signalling NaNs warn when widened
            values = np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0, posinf=255.0, neginf=0.0)
        if values.size and values.min() >= 0.0 and values.max() <= 1.0:
            values = values * 255.0
        return _gray_to_rgb(np.round(np.clip(values, 0, 255)).astype(np.uint8))
    if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
        return _composite_on_white(np.asarray(image.convert("RGBA")))
    return np.asarray(image.convert("RGB"))


def _from_array(array: np.ndarray, max_pixels: int, max_side: int) -> np.ndarray:
    if array.dtype != np.uint8:
        raise BadImageError(f"a numpy image must be uint8, got {array.dtype}")
    if array.ndim == 2:
        array = array[:, :, None]
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise BadImageError(f"a numpy image must be HxW or HxWxC with C in (1, 3, 4), got shape {array.shape}")
    _check_size(array.shape[1], array.shape[0], max_pixels, max_side)
    if array.shape[2] == 1:
        array = _gray_to_rgb(array[:, :, 0])
    elif array.shape[2] == 4:
        array = _composite_on_white(array)
    return _checked(array, max_pixels, max_side)


def _tensor_array(tensor: torch.Tensor) -> np.ndarray:
    """(H, W, C) uint8 array of a (C, H, W) uint8 or [0, 1] float tensor."""
    import torch

    if tensor.ndim != 3 or tensor.shape[0] not in (1, 3, 4):
        raise BadImageError(f"a tensor image must be CxHxW with C in (1, 3, 4), got shape {tuple(tensor.shape)}")
    tensor = tensor.detach().cpu()
    if tensor.is_floating_point():
        if tensor.numel() and (not torch.isfinite(tensor).all() or tensor.min() < 0 or tensor.max() > 1):
            raise BadImageError("a float tensor image must hold finite values in [0, 1]")
        tensor = (tensor.float() * 255).round().to(torch.uint8)
    elif tensor.dtype != torch.uint8:
        raise BadImageError(f"a tensor image must be uint8 or float, got {tensor.dtype}")
    return tensor.permute(1, 2, 0).numpy()


def _gray_to_rgb(gray: np.ndarray) -> np.ndarray:
    return np.repeat(gray[:, :, None], 3, axis=2)


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """HWC4 uint8 with straight alpha -> HWC3 uint8 over a white background."""
    rgb = rgba[:, :, :3].astype(np.uint32)
    alpha = rgba[:, :, 3:].astype(np.uint32)
    return ((rgb * alpha + 255 * (255 - alpha) + 127) // 255).astype(np.uint8)


def _checked(hwc: np.ndarray, max_pixels: int, max_side: int) -> np.ndarray:
    _check_size(hwc.shape[1], hwc.shape[0], max_pixels, max_side)
    return hwc


def _own_copy(hwc: np.ndarray) -> np.ndarray:
    """A C-contiguous copy (the caller's array may change)."""
    if hwc.flags.c_contiguous:
        return hwc.copy()
    copy = np.empty(hwc.shape, dtype=np.uint8)  # e.g. a view of (C, H, W) memory: plane by plane is 5x faster
    for channel in range(hwc.shape[2]):
        copy[:, :, channel] = hwc[:, :, channel]
    return copy
