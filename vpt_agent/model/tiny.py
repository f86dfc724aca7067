"""Tiny VPT models built from configs: random weights for tests and benchmarks, and the
architecture the bundled demo model is trained from."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..errors import ConfigError
from ..tokens import CONFIG_TOKEN_FIELDS
from .config import VPTFields, config_class_for
from .modeling import vpt_model_class
from .tokenizer import build_char_tokenizer, special_ids

TINY_DINO: dict[str, Any] = {
    "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2, "mlp_ratio": 4,
    "image_size": 224, "patch_size": 14, "layerscale_value": 1.0, "layer_norm_eps": 1e-6,
    "hidden_act": "gelu", "qkv_bias": True, "use_swiglu_ffn": False,
}
TINY_SAM: dict[str, Any] = {
    "hidden_size": 32, "output_channels": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
    "image_size": 1024, "patch_size": 16, "window_size": 14, "global_attn_indexes": [1],
    "mlp_ratio": 4.0, "layer_norm_eps": 1e-6, "qkv_bias": True, "use_abs_pos": True, "use_rel_pos": True,
}


def tiny_vision_config(arch: str, hidden: int) -> dict[str, Any]:
    """A 2-block vision tower of `arch` ("qwen2_vl" or "qwen2_5_vl") with output width `hidden`; the
    Qwen2.5-VL one has 56-px windows (2x2 merged tokens) and one full-attention block, so that images
    of a few dozen pixels span several windows."""
    common = {"depth": 2, "num_heads": 2, "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2}
    if arch == "qwen2_vl":
        return {**common, "embed_dim": 32, "mlp_ratio": 4, "hidden_size": hidden}
    if arch == "qwen2_5_vl":
        return {**common, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": hidden,
                "window_size": 56, "fullatt_block_indexes": [1], "tokens_per_second": 2}
    raise ConfigError(f"unknown arch {arch!r}: qwen2_vl or qwen2_5_vl")


QWEN_TOKEN_FIELDS = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
"""The token-id fields of a plain Qwen2-VL / Qwen2.5-VL config."""


def tiny_base_fields(tokenizer, hidden: int = 64, arch: str = "qwen2_vl") -> dict[str, Any]:
    """The fields of a plain `arch` config ("qwen2_vl" or "qwen2_5_vl") a few hundred thousand parameters
    large, matching `tokenizer`'s chat token ids (no VPT field)."""
    vocab = tokenizer.get_vocab()
    return dict(
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        rope_scaling={"type": "mrope", "mrope_section": [2, 3, 3]},
        max_position_embeddings=4096,
        tie_word_embeddings=False,
        vision_config=tiny_vision_config(arch, hidden),
        initializer_range=0.1,
        bos_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **{field: vocab[CONFIG_TOKEN_FIELDS[field]] for field in QWEN_TOKEN_FIELDS},
    )


def tiny_config(tokenizer, branches: Sequence[str] = ("dino", "sam", "clip"), hidden: int = 64, *,
                arch: str = "qwen2_vl", **overrides) -> VPTFields:
    """A VPT config on `arch` ("qwen2_vl" or "qwen2_5_vl") a few hundred thousand parameters large,
    matching `tokenizer`'s ids."""
    fields: dict[str, Any] = dict(
        tiny_base_fields(tokenizer, hidden, arch),
        vision_encoder_ls=list(branches),
        detection_encoder_config=dict(TINY_DINO),
        seg_encoder_config=dict(TINY_SAM),
        **special_ids(tokenizer),
    )
    fields.update(overrides)
    return config_class_for(arch)(**fields)  # arch is the base model_type


def tiny_vpt_model(branches: Sequence[str] = ("dino", "sam", "clip"), seed: int = 0, *, arch: str = "qwen2_vl",
                   **overrides):
    """(model, tokenizer): a tiny random-weight VPT model on `arch` ("qwen2_vl" or "qwen2_5_vl") in eval
    mode and the char tokenizer."""
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    config = tiny_config(tokenizer, branches, arch=arch, **overrides)
    model = vpt_model_class(config)(config).eval()
    return model, tokenizer
