"""DINOv2 branch: a timm ViT with the architecture of a transformers ``Dinov2Config``.

The model always sees 224x224 images (16x16 = 256 patches of 14 px) and returns the patch tokens
of the last layer (CLS dropped), i.e. ``Dinov2Model(images).last_hidden_state[:, 1:]``.
"""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from functools import partial

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn

from ..errors import BadImageError, CheckpointError, ConfigError
from .qwen_image import check_image, resize_for_qwen, resize_like_pil

DINO_IMAGE_SIZE = 224
DINO_RESIZE_SHORTEST = 256
DINO_REGULARIZE_MAX_SIDE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# transformers Dinov2Config defaults, used for keys a config dict leaves out.
DINOV2_DEFAULTS = {
    "hidden_size": 768,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "mlp_ratio": 4,
    "hidden_act": "gelu",
    "layer_norm_eps": 1e-6,
    "patch_size": 14,
    "num_channels": 3,
    "qkv_bias": True,
    "layerscale_value": 1.0,
    "use_swiglu_ffn": False,
}


def config_as_dict(config: object, model_types: tuple[str, ...]) -> dict:
    """A transformers config (object or dict, extra keys allowed) as a plain dict.

    Raises ConfigError if it is neither or if its ``model_type`` (when set) is not one of
    ``model_types``.
    """
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    if not isinstance(config, Mapping):
        raise ConfigError(f"expected a config object or dict, got {type(config).__name__}")
    model_type = config.get("model_type")
    if model_type and model_type not in model_types:
        raise ConfigError(f"expected a config of model_type {model_types}, got {model_type!r}")
    return dict(config)


def single_int(value: object, name: str) -> int:
    """An int config value, also accepted as a square pair [n, n]."""
    if isinstance(value, (list, tuple)) and len(value) == 2 and value[0] == value[1]:
        value = value[0]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be an int (or a square pair), got {value!r}")
    return value


class DinoEncoder(VisionTransformer):
    """timm ViT laid out as DINOv2; ``forward`` gives the (N, 256, hidden) patch tokens."""

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Patch tokens of the last layer (after the final LayerNorm) for (N, 3, 224, 224) images."""
        expected = (3, *self.patch_embed.img_size)
        if images.ndim != 4 or tuple(images.shape[1:]) != expected:
            raise BadImageError(f"expected images of shape (N, {expected}), got {tuple(images.shape)}")
        tokens = self.forward_features(images.to(self.patch_embed.proj.weight.dtype))
        return tokens[:, self.num_prefix_tokens :]


def build_dino_encoder(config: dict | object) -> DinoEncoder:
    """Build a randomly initialised DinoEncoder from a ``Dinov2Config`` (object or dict).

    Unknown keys (e.g. the transformers-4.45 ``id2label``, ``torch_dtype``) are ignored;
    ``image_size`` is ignored too since the encoder is built for 224x224 inputs.
    """
    cfg = {**DINOV2_DEFAULTS, **config_as_dict(config, ("dinov2",))}
    if cfg["use_swiglu_ffn"]:
        raise ConfigError("DINOv2 with a SwiGLU MLP (use_swiglu_ffn) is not supported")
    if cfg["hidden_act"] != "gelu":
        raise ConfigError(f"DINOv2 hidden_act must be 'gelu', got {cfg['hidden_act']!r}")
    patch_size = single_int(cfg["patch_size"], "patch_size")
    if DINO_IMAGE_SIZE % patch_size:
        raise ConfigError(f"patch_size {patch_size} does not divide {DINO_IMAGE_SIZE}")
    return DinoEncoder(
        img_size=DINO_IMAGE_SIZE,
        patch_size=patch_size,
        in_chans=cfg["num_channels"],
        num_classes=0,
        embed_dim=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"],
        num_heads=cfg["num_attention_heads"],
        mlp_ratio=cfg["mlp_ratio"],
        qkv_bias=cfg["qkv_bias"],
        # Every DINOv2 layer has a layer scale; its init value is irrelevant once weights load.
        init_values=cfg["layerscale_value"] or 1.0,
        norm_layer=partial(nn.LayerNorm, eps=cfg["layer_norm_eps"]),
        act_layer=nn.GELU,
    )


_LAYER_KEY = re.compile(r"encoder\.layer\.(\d+)\.(.+)")
# Per-layer modules: transformers 4.x names (those of the released checkpoints) and 5.x names.
_LAYER_RENAMES = {
    "norm1": "norm1",
    "norm2": "norm2",
    "mlp.fc1": "mlp.fc1",
    "mlp.fc2": "mlp.fc2",
    "attention.output.dense": "attn.proj",
    "attention.o_proj": "attn.proj",
}
_LAYER_SCALES = {"layer_scale1.lambda1": "ls1.gamma", "layer_scale2.lambda1": "ls2.gamma"}
_QKV_PARTS = {
    "attention.attention.query": 0,
    "attention.attention.key": 1,
    "attention.attention.value": 2,
    "attention.q_proj": 0,
    "attention.k_proj": 1,
    "attention.v_proj": 2,
}


def _resample_pos_embed(pos: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """Bicubic resampling of a (1, 1 + n*n, d) table to ``grid``, CLS position kept as is.

    Exactly what transformers' Dinov2 does at run time: interpolate in float32 to an explicit
    size, ``align_corners=False``, no antialias, then cast back.
    """
    side = math.isqrt(max(pos.shape[1] - 1, 0)) if pos.ndim == 3 else 0
    if pos.ndim != 3 or pos.shape[0] != 1 or side < 1 or side * side != pos.shape[1] - 1:
        raise CheckpointError(f"position table of shape {tuple(pos.shape)} is not (1, 1 + n*n, d)")
    if (side, side) == tuple(grid):
        return pos
    dim = pos.shape[-1]
    patch_pos = pos[:, 1:].reshape(1, side, side, dim).permute(0, 3, 1, 2).to(torch.float32)
    patch_pos = F.interpolate(patch_pos, size=grid, mode="bicubic", align_corners=False)
    patch_pos = patch_pos.permute(0, 2, 3, 1).reshape(1, -1, dim).to(pos.dtype)
    return torch.cat((pos[:, :1], patch_pos), dim=1)


def check_converted(converted: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """Return ``converted`` if its keys and shapes are exactly ``model``'s, else raise CheckpointError."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(converted))
    unexpected = sorted(set(converted) - set(expected))
    if missing or unexpected:
        raise CheckpointError(f"weights do not fit: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, value in converted.items():
        if value.shape != expected[key].shape:
            raise CheckpointError(
                f"{key}: checkpoint shape {tuple(value.shape)} != model shape {tuple(expected[key].shape)}"
            )
    return converted


def convert_hf_dinov2_state_dict(
    state_dict: dict[str, torch.Tensor], model: DinoEncoder
) -> dict[str, torch.Tensor]:
    """Map a transformers ``Dinov2Model`` state dict (no prefix) onto ``model``'s timm keys.

    Accepts the 4.x names of the released checkpoints (``attention.attention.query``, ...) and
    the 5.x ones (``attention.q_proj``, ...). query/key/value are fused into ``qkv``,
    ``layer_scale*.lambda1`` become ``ls*.gamma``, ``mask_token`` is dropped, and the position
    table is resampled to the model's grid (see ``_resample_pos_embed``). The result loads with
    ``model.load_state_dict(..., strict=True)``; anything that would not raises CheckpointError.
    """
    out: dict[str, torch.Tensor] = {}
    qkv: dict[tuple[int, str], list[torch.Tensor | None]] = {}
    for key, value in state_dict.items():
        if key == "embeddings.mask_token":
            continue
        if key == "embeddings.cls_token":
            out["cls_token"] = value
        elif key == "embeddings.position_embeddings":
            out["pos_embed"] = _resample_pos_embed(value, tuple(model.patch_embed.grid_size))
        elif key.startswith("embeddings.patch_embeddings.projection."):
            out["patch_embed.proj." + key.rsplit(".", 1)[1]] = value
        elif key.startswith("layernorm."):
            out["norm." + key.rsplit(".", 1)[1]] = value
        elif match := _LAYER_KEY.fullmatch(key):
            layer, rest = int(match[1]), match[2]
            module, _, param = rest.rpartition(".")
            if rest in _LAYER_SCALES:
                out[f"blocks.{layer}.{_LAYER_SCALES[rest]}"] = value
            elif module in _LAYER_RENAMES:
                out[f"blocks.{layer}.{_LAYER_RENAMES[module]}.{param}"] = value
            elif module in _QKV_PARTS:
                qkv.setdefault((layer, param), [None, None, None])[_QKV_PARTS[module]] = value
            else:
                raise CheckpointError(f"unexpected DINOv2 weight {key!r}")
        else:
            raise CheckpointError(f"unexpected DINOv2 weight {key!r}")
    for (layer, param), parts in qkv.items():
        if any(part is None for part in parts):
            raise CheckpointError(f"layer {layer}: query/key/value {param} incomplete")
        out[f"blocks.{layer}.attn.qkv.{param}"] = torch.cat(parts, dim=0)
    return check_converted(out, model)


def convert_timm_dinov2_state_dict(
    state_dict: dict[str, torch.Tensor], model: DinoEncoder
) -> dict[str, torch.Tensor]:
    """A DINOv2 state dict in timm's (= the original ``dinov2_vit*14_pretrain.pth``'s) names for ``model``:
    ``mask_token`` dropped, the position table resampled to the model's grid; a CheckpointError for
    anything that would not load with ``strict=True``."""
    out = {key: value for key, value in state_dict.items() if key != "mask_token"}
    if "pos_embed" in out:
        out["pos_embed"] = _resample_pos_embed(out["pos_embed"], tuple(model.patch_embed.grid_size))
    return check_converted(out, model)


def preprocess_dino(image: torch.Tensor, max_side: int | None = DINO_REGULARIZE_MAX_SIDE) -> torch.Tensor:
    """A uint8 (3, H, W) image as a normalized float32 (3, 224, 224) DINOv2 input, on its device.

    As the reference pipeline: :func:`resize_for_qwen` with ``max_side`` (skipped if None), then
    the DINOv2 image-processor defaults: bicubic resize of the shortest edge to 256 (long edge
    ``int(256 * long / short)``), centre crop 224, rescale 1/255, ImageNet mean/std.
    """
    check_image(image)
    if max_side is not None:
        image = resize_for_qwen(image, max_side=max_side)
    height, width = image.shape[1:]
    long_edge = int(DINO_RESIZE_SHORTEST * max(height, width) / min(height, width))
    size = (DINO_RESIZE_SHORTEST, long_edge) if height <= width else (long_edge, DINO_RESIZE_SHORTEST)
    image = resize_like_pil(image, size, "bicubic")
    top = (size[0] - DINO_IMAGE_SIZE) // 2
    left = (size[1] - DINO_IMAGE_SIZE) // 2
    image = image[:, top : top + DINO_IMAGE_SIZE, left : left + DINO_IMAGE_SIZE]
    mean = torch.tensor(IMAGENET_MEAN, device=image.device).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=image.device).view(3, 1, 1)
    return (image.to(torch.float32) / 255.0 - mean) / std
