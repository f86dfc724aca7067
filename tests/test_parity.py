"""Parity with the paper's own code: the golden fixtures in tests/fixtures/reference (see its README)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vpt_agent.model import VPTForConditionalGeneration

FIXTURES = Path(__file__).parent / "fixtures" / "reference"
ENCODERS = json.loads((FIXTURES / "encoders.json").read_text())
TOL = dict(rtol=1e-4, atol=1e-3)


def load_fixture(variant: str, **overrides):
    model = VPTForConditionalGeneration.from_pretrained(
        FIXTURES / variant,
        detection_encoder_config=ENCODERS["dino"]["config"],
        seg_encoder_config=ENCODERS["sam"]["vision_config"],
        **overrides,
    )
    inputs = load_file(FIXTURES / variant / "inputs.safetensors")
    outputs = load_file(FIXTURES / variant / "outputs.safetensors")
    kwargs = dict(
        input_ids=inputs["input_ids"],
        attention_mask=inputs["attention_mask"],
        pixel_values=inputs["pixel_values"],
        image_grid_thw=inputs["image_grid_thw"],
        labels=inputs["labels"],
        use_cache=False,
    )
    if variant == "dino":
        kwargs["detection_images"] = inputs["detection_images"]
    elif variant == "sam":
        kwargs["seg_images"] = inputs["seg_images_int8"].float() / 32
    else:
        kwargs["clip_pixel_values"] = inputs["clip_pixel_values"]
        kwargs["clip_images_grid_thw"] = inputs["clip_images_grid_thw"]
    return model, inputs, outputs, kwargs


@pytest.fixture(scope="module", params=["dino", "sam", "clip"])
def fixture(request):
    torch.manual_seed(0)
    with torch.no_grad():
        yield (request.param, *load_fixture(request.param))


def test_two_pass_logits_and_loss(fixture):
    variant, model, inputs, ref, kwargs = fixture
    with torch.no_grad():
        out = model(position_ids=inputs["position_ids"], **kwargs)
    torch.testing.assert_close(out.logits, ref["logits"], **TOL)
    torch.testing.assert_close(out.loss.reshape(1), ref["loss"], rtol=0, atol=1e-4)
    branch_cond = next(iter(out.action_conditions.values()))
    torch.testing.assert_close(branch_cond, ref["prompt"], **TOL)


def test_one_pass_logits_and_loss(fixture):
    variant, model, inputs, ref, kwargs = fixture
    model.config.num_inner_forward_run = 1
    try:
        with torch.no_grad():
            out = model(position_ids=inputs["position_ids"], **kwargs)
    finally:
        model.config.num_inner_forward_run = 2
    torch.testing.assert_close(out.logits, ref["logits_1pass"], **TOL)
    torch.testing.assert_close(out.loss.reshape(1), ref["loss_1pass"], rtol=0, atol=1e-4)


def test_no_position_ids_uses_plain_positions(fixture):
    variant, model, inputs, ref, kwargs = fixture
    with torch.no_grad():
        out = model(position_ids=None, **kwargs)
    torch.testing.assert_close(out.logits, ref["logits_posNone"], **TOL)


@pytest.mark.parametrize("mask_id", [1, 2])
def test_paragraph_masking(fixture, mask_id):
    variant, model, inputs, ref, kwargs = fixture
    model.config.para_mask_id = mask_id
    try:
        with torch.no_grad():
            out = model(position_ids=inputs["position_ids"], **kwargs)
    finally:
        model.config.para_mask_id = 0
    torch.testing.assert_close(out.logits, ref[f"logits_para_mask_{mask_id}"], **TOL)


def test_intermediates(fixture):
    """Vision tower, branch encoder and projector outputs, with and without the condition."""
    variant, model, inputs, ref, kwargs = fixture
    with torch.no_grad():
        visual = torch.cat(model.model.get_image_features(inputs["pixel_values"], inputs["image_grid_thw"]).pooler_output)
        torch.testing.assert_close(visual, ref["visual_image_embeds"], **TOL)
        branch = variant  # fixture variants are named like the branches
        if variant == "dino":
            feats = model.encode_branch(branch, kwargs["detection_images"])
            torch.testing.assert_close(feats[0], ref["encoder_last_hidden_state"][0, 1:], **TOL)
        elif variant == "sam":
            feats = model.encode_branch(branch, kwargs["seg_images"])
            torch.testing.assert_close(feats[0][:, ::4, ::4], ref["encoder_output_sub4"][0], **TOL)
        else:
            feats = model.encode_branch(branch, kwargs["clip_pixel_values"], kwargs["clip_images_grid_thw"])
            torch.testing.assert_close(feats[0], ref["clip_visual_embeds"], **TOL)
        torch.testing.assert_close(model.project_branch(branch, feats), ref["projector_out_pass1"], **TOL)
        torch.testing.assert_close(
            model.project_branch(branch, feats, ref["prompt"]), ref["projector_out_pass2"], **TOL
        )
