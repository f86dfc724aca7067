"""The transformers APIs the model calls directly, checked one by one so that a transformers release
that renames one fails here, with a message naming it, and not as a wrong answer far away.

Why this matters: `Qwen2VLTextModel.forward` takes `**kwargs`, so on transformers < 5.24 (where the
keyword was `past_key_values`) the `cache=` the batch passes is swallowed, the KV cache stays empty,
and only a later attribute error hints at it. The floor in pyproject.toml (5.24) is the lowest release
on which the whole suite passes (5.0 ... 5.23 tried)."""
from __future__ import annotations

import dataclasses
import inspect

import pytest
import torch
import transformers
from transformers import DynamicCache, Qwen2VLConfig, Qwen2VLImageProcessor, StaticCache
from transformers.modeling_outputs import BaseModelOutputWithPast
from transformers.models.qwen2_5_vl import modeling_qwen2_5_vl as qwen2_5_vl
from transformers.models.qwen2_vl import modeling_qwen2_vl as qwen2_vl
from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLTextConfig
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize


def require(ok: bool, used_by: str, api: str, what: str) -> None:
    if not ok:
        pytest.fail(f"transformers {transformers.__version__}: {api} changed ({what}); {used_by} relies on it",
                    pytrace=False)


def explicit(fn, names: list[str]) -> list[str]:
    """Those of `names` that are not named parameters of `fn` (a `**kwargs` would swallow them)."""
    params = inspect.signature(fn).parameters
    return [n for n in names if n not in params or params[n].kind is inspect.Parameter.VAR_KEYWORD]


@pytest.fixture(scope="module")
def text_model():
    torch.manual_seed(0)
    config = Qwen2VLTextConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                               rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]})
    return qwen2_vl.Qwen2VLTextModel(config).eval()


def test_the_language_model_takes_and_fills_the_cache_keyword(text_model):
    missing = explicit(qwen2_vl.Qwen2VLTextModel.forward,
                       ["inputs_embeds", "attention_mask", "position_ids", "cache", "use_cache"])
    require(not missing, "VPTForConditionalGeneration.forward", "Qwen2VLTextModel.forward",
            f"no parameter {missing}; before 5.24 the cache keyword was past_key_values")
    require("cache" in {f.name for f in dataclasses.fields(BaseModelOutputWithPast)},
            "VPTForConditionalGeneration.forward (out.cache)", "BaseModelOutputWithPast", "no `cache` field")
    cache = DynamicCache()
    with torch.no_grad():
        out = text_model(inputs_embeds=torch.randn(1, 5, 16), position_ids=torch.arange(5).expand(3, 1, 5),
                         cache=cache, use_cache=True)
    require(cache.get_seq_length() == 5 and out.cache is cache, "Batch (one KV cache for all rows)",
            "Qwen2VLTextModel(cache=...)", "the cache passed in is not the one filled and returned")


def test_caches_as_the_batch_and_the_static_decoder_use_them(text_model):
    keys, values = torch.zeros(2, 1, 3, 8), torch.ones(2, 1, 3, 8)
    cache = DynamicCache(ddp_cache_data=[(keys, values)])
    require(torch.equal(cache.layers[0].keys, keys) and torch.equal(cache.layers[0].values, values),
            "Batch._set_layers", "DynamicCache(ddp_cache_data=...).layers[i].keys/values", "not the tensors given")
    static = StaticCache(config=text_model.config, max_cache_len=16)
    layer = static.layers[0]
    layer.lazy_initialization(keys[:, :, :1], values[:, :, :1])
    layer.cumulative_length.fill_(3)
    layer.update(keys[:, :, :1] + 5, values[:, :, :1])
    require(layer.keys.shape == (2, 1, 16, 8) and bool((layer.keys[:, :, 3] == 5).all())
            and int(layer.cumulative_length) == 4, "StaticDecoder", "StaticLayer",
            "lazy_initialization / cumulative_length / update no longer write at the cumulative length")


@pytest.mark.parametrize("base", [qwen2_vl.Qwen2VLModel, qwen2_5_vl.Qwen2_5_VLModel])
def test_the_base_model_helpers_the_conversation_and_reference_call(base):
    for name, used_by, names in [
        ("get_image_features", "VPTMixin.embed", ["pixel_values", "image_grid_thw"]),
        ("get_rope_index", "model.reference", ["input_ids", "mm_token_type_ids", "image_grid_thw"]),
        ("get_vision_position_ids", "Conversation.positions",
         ["start_position", "grid_thw", "temp_merge_size", "spatial_merge_size", "device"]),
    ]:
        fn = getattr(base, name, None)
        require(fn is not None, used_by, f"{base.__name__}.{name}", "it is gone")
        require(not explicit(fn, names), used_by, f"{base.__name__}.{name}", f"no parameter {explicit(fn, names)}")
    order = list(inspect.signature(base.get_vision_position_ids).parameters)[1:5]
    require(order == ["start_position", "grid_thw", "temp_merge_size", "spatial_merge_size"],
            "Conversation.positions (positional call)", f"{base.__name__}.get_vision_position_ids", f"order {order}")


def test_the_config_hook_and_the_rotary_initialisation(text_model):
    require(dataclasses.is_dataclass(Qwen2VLConfig) and "__post_init__" in vars(Qwen2VLConfig),
            "VPTConfig.__post_init__", "Qwen2VLConfig", "not a dataclass with its own __post_init__")
    rotary = text_model.rotary_emb
    expected = rotary.inv_freq.clone()
    rotary.inv_freq.zero_()
    text_model._init_weights(rotary)
    require(torch.allclose(rotary.inv_freq, expected), "loading (buffers of a meta-device build)",
            "PreTrainedModel._init_weights(rotary)", "it no longer recomputes inv_freq")


def test_the_image_processor_fields_and_smart_resize():
    require(not explicit(smart_resize, ["height", "width", "factor", "min_pixels", "max_pixels"]),
            "qwen_image.qwen_size", "smart_resize", "its keywords changed")
    processor = Qwen2VLImageProcessor()
    require({"shortest_edge", "longest_edge"} <= set(dict(processor.size)) and processor.patch_size == 14
            and processor.merge_size == 2, "qwen_image.qwen_size", "Qwen2VLImageProcessor",
            f"size {dict(processor.size)}, patch_size / merge_size")
