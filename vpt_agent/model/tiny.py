"""Tiny VPT models built from configs: random weights for tests and benchmarks, and the
architecture the bundled demo model is trained from."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .config import VPTConfig
from .modeling import VPTForConditionalGeneration
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


def tiny_config(tokenizer, branches: Sequence[str] = ("dino", "sam", "clip"), hidden: int = 64, **overrides) -> VPTConfig:
    """A Qwen2-VL VPT config a few hundred thousand parameters large, matching `tokenizer`'s ids."""
    ids = special_ids(tokenizer)
    fields: dict[str, Any] = dict(
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
        vision_config={"depth": 2, "embed_dim": 32, "num_heads": 2, "mlp_ratio": 4, "hidden_size": hidden,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        vision_encoder_ls=list(branches),
        detection_encoder_config=dict(TINY_DINO),
        seg_encoder_config=dict(TINY_SAM),
        initializer_range=0.1,
        bos_token_id=ids["pad_token_id"],
        **ids,
    )
    fields.update(overrides)
    return VPTConfig(**fields)


def tiny_vpt_model(branches: Sequence[str] = ("dino", "sam", "clip"), seed: int = 0, **overrides):
    """(model, tokenizer): a tiny random-weight VPT model in eval mode and the char tokenizer."""
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    model = VPTForConditionalGeneration(tiny_config(tokenizer, branches, **overrides)).eval()
    return model, tokenizer
