"""Config, loading and saving, and the model's bad-input errors."""
from __future__ import annotations

import json
import threading
from pathlib import Path

import pytest
import torch
from transformers import AutoConfig, AutoModelForImageTextToText

from vpt_agent.errors import CheckpointError, ConfigError, InputMismatchError, MissingBranchError
from vpt_agent.model import VPTConfig, VPTForConditionalGeneration
from vpt_agent.model.config import DINOV2_LARGE, SAM_VIT_LARGE
from vpt_agent.model.tiny import tiny_vpt_model

from released import released_checkpoint

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
ENCODERS = json.loads((FIXTURES / "encoders.json").read_text())
TINY_ENCODERS = dict(
    detection_encoder_config=ENCODERS["dino"]["config"], seg_encoder_config=ENCODERS["sam"]["vision_config"]
)


def test_released_config_reads_defaults_and_round_trips(tmp_path):
    config = VPTConfig.from_pretrained(FIXTURES / "dino")
    assert config.model_type == "qwen2_vl_vpt"
    assert config.detection_action_id == 226 and config.num_inner_forward_run == 2
    assert config.vision_encoder_ls == ["dino"] and config.alignment is False  # extra fields kept
    assert config.detection_encoder_config == DINOV2_LARGE  # absent -> dinov2-large, spelled out
    assert config.seg_encoder_config == SAM_VIT_LARGE
    config.save_pretrained(tmp_path)
    again = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(again, VPTConfig)
    strip = lambda d: {k: v for k, v in d.items() if k != "_name_or_path"}  # noqa: E731
    assert strip(again.to_dict()) == strip(config.to_dict())


def test_sharded_bin_checkpoint_loads_like_safetensors(tmp_path):
    ckpt = released_checkpoint(tmp_path / "dino")
    from_bin = VPTForConditionalGeneration.from_pretrained(ckpt, **TINY_ENCODERS)
    from_st = VPTForConditionalGeneration.from_pretrained(FIXTURES / "dino", **TINY_ENCODERS)
    for (k1, v1), (k2, v2) in zip(from_bin.state_dict().items(), from_st.state_dict().items()):
        assert k1 == k2 and torch.equal(v1, v2)


def test_auto_class_resolves_and_save_load_round_trips_exactly(tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(FIXTURES / "sam", **TINY_ENCODERS)
    assert isinstance(model, VPTForConditionalGeneration)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file() and not list(tmp_path.glob("*.bin"))
    again = VPTForConditionalGeneration.from_pretrained(tmp_path)  # encoder configs come from config.json
    assert again.state_dict().keys() == model.state_dict().keys()
    assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))


def test_dtype_argument(tmp_path):
    model = VPTForConditionalGeneration.from_pretrained(FIXTURES / "clip", torch_dtype=torch.bfloat16)
    assert next(model.parameters()).dtype == torch.bfloat16


def test_config_without_vpt_fields_is_refused(tmp_path):
    raw = json.loads((FIXTURES / "dino" / "config.json").read_text())
    for key in [k for k in raw if k.startswith(("detection_", "seg_", "clip_"))]:
        del raw[key]
    raw["model_type"] = "qwen2_vl"
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match="detection_action_id"):
        VPTForConditionalGeneration.from_pretrained(tmp_path)


def test_other_architecture_is_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="'llama' checkpoint"):
        VPTForConditionalGeneration.from_pretrained(tmp_path)


def test_unknown_branch_is_refused():
    with pytest.raises(ConfigError, match="unknown branches"):
        tiny_vpt_model(branches=("dino", "depth"))


def test_missing_and_misshaped_branch_weights_are_named(tmp_path):
    ckpt = released_checkpoint(tmp_path / "dino", shards=1)
    state = torch.load(next(ckpt.glob("*.bin")), weights_only=True)
    del state["detection_projector.linear_feature.weight"]
    state["detection_projector.linear_condition.bias"] = torch.zeros(3)
    torch.save(state, next(ckpt.glob("*.bin")))
    with pytest.raises(CheckpointError) as err:
        VPTForConditionalGeneration.from_pretrained(ckpt, **TINY_ENCODERS)
    assert "detection_projector.linear_feature.weight" in str(err.value)
    assert "detection_projector.linear_condition.bias" in str(err.value)


class _Exploit:
    def __reduce__(self):
        return (print, ("pwned",))


def test_code_executing_pickle_is_refused(tmp_path):
    ckpt = released_checkpoint(tmp_path / "dino", shards=1)
    torch.save({"x": _Exploit()}, next(ckpt.glob("*.bin")))
    with pytest.raises(CheckpointError, match="refused to load"):
        VPTForConditionalGeneration.from_pretrained(ckpt, **TINY_ENCODERS)


def test_missing_directory_is_a_checkpoint_error(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        VPTForConditionalGeneration.from_pretrained(tmp_path / "nope")


def test_placeholder_count_mismatch_names_the_counts():
    model, tokenizer = tiny_vpt_model(branches=("dino",))
    pad = model.config.detection_image_token_id
    ids = torch.tensor([[1, 2] + [pad] * 10])
    with pytest.raises(InputMismatchError, match="10 <\\|detection_image_pad\\|> positions but 256"):
        model(input_ids=ids, detection_images=torch.zeros(1, 3, 224, 224))
    with pytest.raises(InputMismatchError, match="no dino features"):
        model(input_ids=ids)
    with pytest.raises(MissingBranchError, match="no 'sam' branch"):
        model.projector("sam")


def test_tokenizer_loading_registers_vpt_tokens(tmp_path):
    from vpt_agent.model.loading import load_tokenizer
    from vpt_agent.model.tokenizer import build_char_tokenizer, special_ids

    build_char_tokenizer().save_pretrained(tmp_path)
    tokenizer = load_tokenizer(tmp_path)
    assert special_ids(tokenizer)["detection_action_start_id"] == tokenizer.convert_tokens_to_ids(
        "<|detection_action_start|>"
    )
    assert tokenizer("<|x_3|>", add_special_tokens=False)["input_ids"] == [tokenizer.convert_tokens_to_ids("<|x_3|>")]
    with pytest.raises(CheckpointError, match="no loadable tokenizer"):
        load_tokenizer(FIXTURES / "dino")


def test_released_config_builds_the_large_encoders_without_download():
    """dinov2-large and sam-vit-large from the spelled-out defaults (on the meta device: no memory)."""
    dino_cfg = VPTConfig.from_pretrained(FIXTURES / "dino")
    sam_cfg = VPTConfig.from_pretrained(FIXTURES / "sam")
    with torch.device("meta"):
        dino = VPTForConditionalGeneration(dino_cfg).detection_model
        sam = VPTForConditionalGeneration(sam_cfg).seg_model
    assert round(sum(p.numel() for p in dino.parameters()) / 1e6, 1) == 303.2  # ViT-L/14 at 224 px
    assert round(sum(p.numel() for p in sam.parameters()) / 1e6, 1) == 308.3  # SAM ViT-L image encoder


def test_loading_changes_no_process_wide_default(tmp_path):
    """A thread creating tensors while a model loads in bfloat16 gets float32, as before and after;
    nothing of the model is left without data (its rotary frequencies are computed on load)."""
    seen, loading = set(), threading.Event()

    def create() -> None:
        while not loading.is_set():
            seen.add(torch.zeros(1).dtype)

    thread = threading.Thread(target=create)
    thread.start()
    try:
        for _ in range(3):
            model = VPTForConditionalGeneration.from_pretrained(FIXTURES / "clip", dtype=torch.bfloat16)
    finally:
        loading.set()
        thread.join()
    assert seen == {torch.float32} and torch.get_default_dtype() == torch.float32
    assert not any(t.is_meta for t in model.state_dict(keep_vars=True).values())
    assert all(b.device.type == "cpu" and not b.is_meta for b in model.buffers())
    built = dict(VPTForConditionalGeneration(VPTConfig.from_pretrained(FIXTURES / "clip")).named_buffers())
    loaded = dict(model.named_buffers())
    assert loaded.keys() == built.keys() and all(torch.equal(loaded[k], built[k]) for k in built)
