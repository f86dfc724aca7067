"""VPT on Qwen2.5-VL: the KV-reuse session equals a full recompute on every route, the batching engine
gives each row its solo tokens, the base behaviour is transformers' own `Qwen2_5_VLForConditionalGeneration`,
and a saved model loads as its class and answers through the graph."""
from __future__ import annotations

import json

import pytest
import torch
from test_engine import check_solo_tokens
from test_session import NEW, ROUTES, check_second_round, ids, image, stops
from transformers import AutoModelForImageTextToText, Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration
from transformers.vision_utils import get_vision_window_index

from vpt_agent import build_graph, load_model
from vpt_agent.model import VPTForConditionalGeneration, VPTQwen2_5Config, VPTQwen2_5ForConditionalGeneration
from vpt_agent.model.reference import recompute_greedy, rope_index
from vpt_agent.model.session import VPTSession
from vpt_agent.model.tiny import tiny_vpt_model
from vpt_agent.perception.qwen_image import qwen_pixel_values
from vpt_agent.perception.reencode import branch_features

MALFORMED = "<|region_token_start|><|x_3|><|region_token_end|><|im_end|>"
Q = "What is written on it?"


@pytest.fixture(scope="module")
def tiny():
    # dino, sam and clip branches. Seed 2: no round greedily generates a stray `<|X_action|>` (one without
    # its action start before it), where the reference (pass 1 over raw action embeddings) and the
    # session (each action token's embedding is the hidden state before it) part ways by design.
    return tiny_vpt_model(arch="qwen2_5_vl", seed=2)


def test_tiny_model_is_qwen2_5_vl_with_several_windows(tiny):
    model, _ = tiny
    assert isinstance(model, VPTQwen2_5ForConditionalGeneration) and isinstance(model.config, VPTQwen2_5Config)
    assert type(model.model.visual).__name__ == "Qwen2_5_VisionTransformerPretrainedModel"
    visual = model.model.visual
    _, windows = get_vision_window_index(torch.tensor([[1, 6, 10]]), visual.spatial_merge_size,  # a 90 x 140 image
                                         visual.window_size, visual.patch_size)
    assert len(windows.unique()) - 1 == 6  # 3 x 5 merged tokens in 2 x 2 windows: the test images span several


@pytest.mark.parametrize("route", list(ROUTES))
def test_second_round_equals_reference_recompute(tiny, route):
    """Regions and re-encoding: the round after the tool equals recomputing the whole conversation
    with Qwen2.5-VL's own `get_rope_index` positions, token for token and in its last logits."""
    check_second_round(*tiny, route)


@pytest.mark.parametrize("route", ["no action", "re-ask"])
def test_answer_and_reask_equal_reference_recompute(tiny, route):
    model, tokenizer = tiny
    img = image(64, 200, seed=2)
    session = VPTSession(model, tokenizer)
    session.start([img], [Q])
    if route == "re-ask":  # a malformed region request, then the question again as a plain user turn
        session.generate(NEW, forced={0: ids(tokenizer, MALFORMED)})
        session.add_text(0, Q)
    prefix = session.conversation(0)
    turn = session.generate(NEW)[0]
    pv, grid = qwen_pixel_values([img], model.image_processor)
    assert turn.token_ids == recompute_greedy(model, prefix, stop_ids=stops(session), max_new_tokens=NEW,
                                              suppressed=session.suppressed, pixel_values=pv, image_grid_thw=grid)


def test_rows_joining_and_leaving_mid_decode_get_their_solo_tokens(tiny):
    check_solo_tokens(tiny)


def test_static_decoding_gives_the_dynamic_tokens(tiny):
    model, tokenizer = tiny
    turns = []
    for compile in (False, True):
        session = VPTSession(model, tokenizer, compile=compile)
        imgs = [image(90, 140, 3), image(50, 120, 4)]
        session.start(imgs, [Q, "Count"])
        first = session.generate(NEW, forced={1: ids(tokenizer, ROUTES["clip"])})
        session.add_reencode(1, "clip", branch_features(model, "clip", imgs[1:])[0])
        turns.append((first, session.generate(NEW)))
    assert turns[0] == turns[1]


def base_model(model) -> Qwen2_5_VLForConditionalGeneration:
    """transformers' own Qwen2.5-VL with the VPT model's base weights (its branches left out)."""
    fields = {k: v for k, v in model.config.to_dict().items() if k in Qwen2_5_VLConfig.__dataclass_fields__}
    base = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**fields)).eval()
    missing, _ = base.load_state_dict(model.state_dict(), strict=False)
    assert missing == []
    return base


def test_plain_input_is_transformers_qwen2_5_vl(tiny):
    """Without VPT tokens the model is its base: the same logits over an image prompt, and the same
    greedy tokens as transformers' `generate` (its own rope index and cached decoding)."""
    model, tokenizer = tiny
    base = base_model(model)
    img = image(90, 140, seed=5)
    session = VPTSession(model, tokenizer)
    session.start([img], [Q])
    input_ids = torch.tensor([session.conversation(0)])
    turn = session.generate(NEW)[0]
    pv, grid = qwen_pixel_values([img], model.image_processor)
    token_types = (input_ids == model.config.image_token_id).int()
    with torch.no_grad():
        ours = model(input_ids=input_ids, pixel_values=pv, image_grid_thw=grid,
                     position_ids=rope_index(model, input_ids, grid)).logits
        theirs = base(input_ids=input_ids, pixel_values=pv, image_grid_thw=grid, mm_token_type_ids=token_types).logits
        generated = base.generate(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), pixel_values=pv,
                                  image_grid_thw=grid, mm_token_type_ids=token_types, max_new_tokens=NEW,
                                  do_sample=False, suppress_tokens=list(session.suppressed))
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
    assert turn.token_ids == generated[0, input_ids.shape[1]:].tolist()[: len(turn.token_ids)]


def test_saved_model_loads_as_its_class_and_answers_through_the_graph(tiny, tmp_path):
    model, tokenizer = tiny
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    loaded, _ = load_model(tmp_path, device="cpu", dtype=torch.float32)
    for again in (loaded, VPTForConditionalGeneration.from_pretrained(tmp_path),
                  AutoModelForImageTextToText.from_pretrained(tmp_path)):
        assert type(again) is VPTQwen2_5ForConditionalGeneration and again.config.model_type == "qwen2_5_vl_vpt"
        assert again.state_dict().keys() == model.state_dict().keys()
        assert all(torch.equal(a, b) for a, b in zip(again.state_dict().values(), model.state_dict().values()))
        built, loaded = dict(model.named_buffers()), dict(again.named_buffers())  # rotary frequencies too
        assert loaded.keys() == built.keys() and all(torch.equal(loaded[k], built[k]) for k in built)
    raw = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**raw, "model_type": "qwen2_5_vl"}))  # the plain base's type
    assert type(VPTForConditionalGeneration.from_pretrained(tmp_path)) is VPTQwen2_5ForConditionalGeneration
    graph = build_graph(tmp_path, device="cpu", dtype=torch.float32, max_new_tokens=6,
                        force=(ROUTES["region2"], "It is"))
    result = graph.invoke({"image": image(56, 84, seed=6), "q": Q})
    assert [step["node"] for step in result["steps"]] == ["perceive", "mllm", "crop", "mllm", "answer"]
    assert result["error"] is None and result["answer"].startswith("It is")
