"""DINOv2 (timm) and SAM (segment-anything) encoders against transformers and the reference fixtures."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Dinov2Config, Dinov2Model, SamVisionConfig
from transformers.models.sam.modeling_sam import SamVisionEncoder

from vpt_agent.errors import BadImageError, CheckpointError, ConfigError
from vpt_agent.perception.dino import (
    DinoEncoder,
    build_dino_encoder,
    convert_hf_dinov2_state_dict,
)
from vpt_agent.perception.sam import (
    SamEncoder,
    build_sam_encoder,
    convert_hf_sam_vision_state_dict,
)

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
ENCODERS = json.loads((FIXTURES / "encoders.json").read_text())
DINO_CONFIG = ENCODERS["dino"]["config"]  # transformers-4.45 to_dict(): extra keys, image_size 518
SAM_CONFIG = ENCODERS["sam"]["vision_config"]


def _perturbed(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """``model`` in eval mode with every parameter shifted by seeded noise (no trivial weights)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.add_(torch.randn(param.shape, generator=generator) * 0.05)
    return model.eval()


def _prefixed(path: Path, prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix) :]: v for k, v in load_file(path).items() if k.startswith(prefix)}


# ---------------------------------------------------------------- DINOv2


@pytest.mark.parametrize("image_size", [518, 224])
def test_dino_matches_transformers(image_size: int) -> None:
    # transformers 5.24 resizes the 37x37 table at run time exactly as 4.45.2 did
    # (float32, size=(16, 16), bicubic, align_corners=False, no antialias), so the converter's
    # one-off resampling must give the same tokens. With image_size 224 the 16x16 table is
    # already at the timm size and must pass through untouched. A 5.x Dinov2Model names its
    # attention q_proj/k_proj/v_proj/o_proj, so this also covers the 5.x key names.
    torch.manual_seed(0)
    config = Dinov2Config(**{**DINO_CONFIG, "image_size": image_size})
    reference = _perturbed(Dinov2Model(config), seed=1)
    encoder = build_dino_encoder(config).eval()
    state = reference.state_dict()
    converted = convert_hf_dinov2_state_dict(state, encoder)
    encoder.load_state_dict(converted, strict=True)
    if image_size == 224:
        assert converted["pos_embed"] is state["embeddings.position_embeddings"]
    images = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = reference(images).last_hidden_state[:, 1:]
        tokens = encoder(images)
    assert tokens.shape == (2, 256, 32)
    torch.testing.assert_close(tokens, expected, rtol=1e-5, atol=1e-5)  # measured: bit-identical


def test_dino_fixture_bit_exact() -> None:
    """Reference weights (4.45 key names) on the reference input give the reference tokens."""
    encoder = build_dino_encoder(DINO_CONFIG).eval()
    state = _prefixed(FIXTURES / "dino" / "model.safetensors", "detection_model.")
    encoder.load_state_dict(convert_hf_dinov2_state_dict(state, encoder), strict=True)
    images = load_file(FIXTURES / "dino" / "inputs.safetensors")["detection_images"]
    expected = load_file(FIXTURES / "dino" / "outputs.safetensors")["encoder_last_hidden_state"]
    with torch.no_grad():
        tokens = encoder(images)
    # Measured: bit-identical (max |diff| 0.0) on torch 2.14 CPU; the README asks rtol 1e-4, atol 1e-3.
    torch.testing.assert_close(tokens, expected[:, 1:], rtol=0, atol=1e-5)


def test_dino_builder_reads_config_objects_and_ignores_extras() -> None:
    from_dict = build_dino_encoder(DINO_CONFIG)
    from_object = build_dino_encoder(Dinov2Config(**DINO_CONFIG))
    shapes = {k: v.shape for k, v in from_dict.state_dict().items()}
    assert shapes == {k: v.shape for k, v in from_object.state_dict().items()}
    assert isinstance(from_dict, DinoEncoder)
    assert shapes["pos_embed"] == (1, 257, 32)
    assert from_dict.norm.eps == 1e-6 and from_dict.blocks[0].norm1.eps == 1e-6


@pytest.mark.parametrize(
    "change", [{"use_swiglu_ffn": True}, {"hidden_act": "relu"}, {"model_type": "sam"}, {"patch_size": 15}]
)
def test_dino_builder_rejects_unsupported_configs(change: dict) -> None:
    with pytest.raises(ConfigError):
        build_dino_encoder({**DINO_CONFIG, **change})


def test_dino_converter_rejects_misfit_weights() -> None:
    encoder = build_dino_encoder(DINO_CONFIG)
    state = _prefixed(FIXTURES / "dino" / "model.safetensors", "detection_model.")
    with pytest.raises(CheckpointError, match="unexpected"):
        convert_hf_dinov2_state_dict({**state, "pooler.dense.weight": torch.zeros(1)}, encoder)
    incomplete = {k: v for k, v in state.items() if k != "encoder.layer.1.attention.attention.key.bias"}
    with pytest.raises(CheckpointError, match="incomplete"):
        convert_hf_dinov2_state_dict(incomplete, encoder)
    without_norm = {k: v for k, v in state.items() if not k.startswith("layernorm.")}
    with pytest.raises(CheckpointError, match="missing"):
        convert_hf_dinov2_state_dict(without_norm, encoder)
    wider = build_dino_encoder({**DINO_CONFIG, "hidden_size": 64})
    with pytest.raises(CheckpointError, match="shape"):
        convert_hf_dinov2_state_dict(state, wider)


def test_dino_rejects_other_input_sizes() -> None:
    encoder = build_dino_encoder(DINO_CONFIG)
    with pytest.raises(BadImageError):
        encoder(torch.zeros(1, 3, 518, 518))


# ---------------------------------------------------------------- SAM


def test_sam_matches_transformers() -> None:
    config = SamVisionConfig(**SAM_CONFIG)
    config._attn_implementation = "eager"  # sdpa differs by ~1e-5 more; eager is what 4.45 ran
    torch.manual_seed(0)
    reference = _perturbed(SamVisionEncoder(config), seed=3)  # also makes pos/rel-pos non-zero
    encoder = build_sam_encoder(config).eval()
    encoder.load_state_dict(convert_hf_sam_vision_state_dict(reference.state_dict(), encoder), strict=True)
    images = torch.randn(1, 3, 1024, 1024, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        expected = reference(images).last_hidden_state
        features = encoder(images)
    assert features.shape == (1, 256, 64, 64)
    # Measured max |diff| ~9e-6 on values up to ~5 (transformers 5.x orders the rel-pos sums
    # differently from segment-anything), i.e. ~2e-6 relative.
    torch.testing.assert_close(features, expected, rtol=1e-5, atol=1e-5)


def test_sam_fixture_bit_exact() -> None:
    encoder = build_sam_encoder(SAM_CONFIG).eval()
    state = _prefixed(FIXTURES / "sam" / "model.safetensors", "seg_model.")
    encoder.load_state_dict(convert_hf_sam_vision_state_dict(state, encoder), strict=True)
    images = load_file(FIXTURES / "sam" / "inputs.safetensors")["seg_images_int8"].float() / 32
    expected = load_file(FIXTURES / "sam" / "outputs.safetensors")["encoder_output_sub4"]
    with torch.no_grad():
        features = encoder(images)
    assert features.shape == (1, 256, 64, 64)
    # Measured: bit-identical (segment-anything computes attention as transformers 4.45 did).
    torch.testing.assert_close(features[:, :, ::4, ::4], expected, rtol=0, atol=1e-5)


def test_sam_builder_reads_config_objects_and_ignores_extras() -> None:
    from_dict = build_sam_encoder(SAM_CONFIG)
    from_object = build_sam_encoder(SamVisionConfig(**SAM_CONFIG))
    shapes = {k: v.shape for k, v in from_dict.state_dict().items()}
    assert shapes == {k: v.shape for k, v in from_object.state_dict().items()}
    assert isinstance(from_dict, SamEncoder)
    assert shapes["blocks.0.attn.rel_pos_h"] == (27, 16)  # windowed layer (14x14)
    assert shapes["blocks.1.attn.rel_pos_h"] == (127, 16)  # global layer (64x64)


@pytest.mark.parametrize(
    "change", [{"hidden_act": "relu"}, {"mlp_dim": 100}, {"model_type": "dinov2"}, {"patch_size": 15}]
)
def test_sam_builder_rejects_unsupported_configs(change: dict) -> None:
    with pytest.raises(ConfigError):
        build_sam_encoder({**SAM_CONFIG, **change})


def test_sam_converter_rejects_misfit_weights() -> None:
    encoder = build_sam_encoder(SAM_CONFIG)
    state = _prefixed(FIXTURES / "sam" / "model.safetensors", "seg_model.")
    with pytest.raises(CheckpointError, match="unexpected"):
        convert_hf_sam_vision_state_dict({**state, "neck.conv3.weight": torch.zeros(1)}, encoder)
    with pytest.raises(CheckpointError, match="missing"):
        convert_hf_sam_vision_state_dict({k: v for k, v in state.items() if k != "pos_embed"}, encoder)


def test_sam_rejects_other_input_sizes() -> None:
    encoder = build_sam_encoder(SAM_CONFIG)
    with pytest.raises(BadImageError):
        encoder(torch.zeros(1, 3, 512, 512))
