"""SAM branch: segment-anything's ``ImageEncoderViT`` with the architecture of a ``SamVisionConfig``.

``SamEncoder(images)`` maps (N, 3, 1024, 1024) images to the (N, 256, 64, 64) neck output,
i.e. transformers' ``SamVisionEncoder(images).last_hidden_state``.
"""
from __future__ import annotations

import re
from functools import partial

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT
from torch import nn

from ..errors import BadImageError, CheckpointError, ConfigError
from .dino import IMAGENET_MEAN, IMAGENET_STD, check_converted, config_as_dict, single_int
from .qwen_image import check_image, resize_for_qwen, resize_like_pil

SAM_IMAGE_SIZE = 1024

# transformers SamVisionConfig defaults, used for keys a config dict leaves out.
SAM_VISION_DEFAULTS = {
    "hidden_size": 768,
    "output_channels": 256,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "num_channels": 3,
    "image_size": 1024,
    "patch_size": 16,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "qkv_bias": True,
    "mlp_ratio": 4.0,
    "mlp_dim": None,
    "use_abs_pos": True,
    "use_rel_pos": True,
    "window_size": 14,
    "global_attn_indexes": (2, 5, 8, 11),
}
# transformers 4.45 writes an empty model_type for SamVisionConfig; 5.x writes "sam_vision_model".
_SAM_VISION_TYPES = ("sam_vision_model",)


class SamEncoder(ImageEncoderViT):
    """segment-anything image encoder; ``forward`` gives the (N, out_chans, 64, 64) neck output."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Neck features for (N, 3, img_size, img_size) normalized, padded images."""
        expected = (3, self.img_size, self.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise BadImageError(f"expected images of shape (N, {expected}), got {tuple(images.shape)}")
        return super().forward(images.to(self.patch_embed.proj.weight.dtype))


def build_sam_encoder(config: dict | object) -> SamEncoder:
    """Build a randomly initialised SamEncoder from a ``SamVisionConfig`` (object or dict).

    Unknown keys (e.g. the transformers-4.45 ``id2label``, ``torch_dtype``) are ignored.
    """
    cfg = {**SAM_VISION_DEFAULTS, **config_as_dict(config, _SAM_VISION_TYPES)}
    if cfg["hidden_act"] != "gelu":
        raise ConfigError(f"SAM hidden_act must be 'gelu', got {cfg['hidden_act']!r}")
    hidden = cfg["hidden_size"]
    mlp_ratio = cfg["mlp_ratio"]
    if cfg["mlp_dim"] is not None and cfg["mlp_dim"] != int(hidden * mlp_ratio):
        raise ConfigError(f"mlp_dim {cfg['mlp_dim']} != int(hidden_size * mlp_ratio)")
    image_size = single_int(cfg["image_size"], "image_size")
    patch_size = single_int(cfg["patch_size"], "patch_size")
    if image_size % patch_size:
        raise ConfigError(f"patch_size {patch_size} does not divide image_size {image_size}")
    return SamEncoder(
        img_size=image_size,
        patch_size=patch_size,
        in_chans=cfg["num_channels"],
        embed_dim=hidden,
        depth=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        mlp_ratio=mlp_ratio,
        out_chans=cfg["output_channels"],
        qkv_bias=cfg["qkv_bias"],
        norm_layer=partial(nn.LayerNorm, eps=cfg["layer_norm_eps"]),
        act_layer=nn.GELU,
        use_abs_pos=cfg["use_abs_pos"],
        use_rel_pos=cfg["use_rel_pos"],
        window_size=cfg["window_size"],
        global_attn_indexes=tuple(cfg["global_attn_indexes"]),
    )


_RENAMES = (
    (re.compile(r"patch_embed\.projection\.(weight|bias)"), r"patch_embed.proj.\1"),
    (re.compile(r"pos_embed"), r"pos_embed"),
    (re.compile(r"layers\.(\d+)\.layer_norm([12])\.(weight|bias)"), r"blocks.\1.norm\2.\3"),
    (re.compile(r"layers\.(\d+)\.attn\.(qkv|proj)\.(weight|bias)"), r"blocks.\1.attn.\2.\3"),
    (re.compile(r"layers\.(\d+)\.attn\.(rel_pos_[hw])"), r"blocks.\1.attn.\2"),
    (re.compile(r"layers\.(\d+)\.mlp\.(lin[12])\.(weight|bias)"), r"blocks.\1.mlp.\2.\3"),
    (re.compile(r"neck\.conv1\.weight"), r"neck.0.weight"),
    (re.compile(r"neck\.layer_norm1\.(weight|bias)"), r"neck.1.\1"),
    (re.compile(r"neck\.conv2\.weight"), r"neck.2.weight"),
    (re.compile(r"neck\.layer_norm2\.(weight|bias)"), r"neck.3.\1"),
)


def convert_hf_sam_vision_state_dict(
    state_dict: dict[str, torch.Tensor], model: SamEncoder
) -> dict[str, torch.Tensor]:
    """Map a transformers ``SamVisionEncoder`` state dict (no prefix) onto segment-anything keys.

    The result loads with ``model.load_state_dict(..., strict=True)``; anything that would not
    raises CheckpointError.
    """
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        for pattern, target in _RENAMES:
            if pattern.fullmatch(key):
                out[pattern.sub(target, key)] = value
                break
        else:
            raise CheckpointError(f"unexpected SAM vision weight {key!r}")
    return check_converted(out, model)


def preprocess_sam(image: torch.Tensor, max_side: int | None = SAM_IMAGE_SIZE) -> torch.Tensor:
    """A uint8 (3, H, W) image as a normalized, padded float32 (3, 1024, 1024) SAM input.

    As the reference pipeline: :func:`resize_for_qwen` with ``max_side`` (skipped if None), then
    the SAM processor: bilinear resize of the longest side to 1024 (other side
    ``int(side * 1024 / longest + 0.5)``, segment-anything's ResizeLongestSide rule), rescale 1/255,
    ImageNet mean/std (= SAM's pixel mean/std / 255), zero padding at the bottom and right.
    Runs on the image's device.
    """
    check_image(image)
    if max_side is not None:
        image = resize_for_qwen(image, max_side=max_side)
    height, width = image.shape[1:]
    scale = SAM_IMAGE_SIZE / max(height, width)
    size = (int(height * scale + 0.5), int(width * scale + 0.5))
    image = resize_like_pil(image, size, "bilinear")
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    pixels = (image.to(torch.float32) / 255.0 - mean) / std
    return F.pad(pixels, (0, SAM_IMAGE_SIZE - size[1], 0, SAM_IMAGE_SIZE - size[0]))
