"""Multi-round session with KV-cache reuse == recomputing the conversation the reference way."""
from __future__ import annotations

import pytest
import torch

from vpt_agent.errors import InputMismatchError, MissingBranchError
from vpt_agent.model.reference import recompute_greedy, rope_index
from vpt_agent.model.session import VPTSession
from vpt_agent.model.tiny import tiny_vpt_model
from vpt_agent.perception.crop import crop
from vpt_agent.perception.qwen_image import qwen_pixel_values
from vpt_agent.perception.reencode import branch_features, branch_inputs
from vpt_agent.tokens import BRANCHES, parse_actions

NEW = 10  # greedy tokens compared per round


@pytest.fixture(scope="module")
def tiny():
    return tiny_vpt_model(seed=0)


def image(h: int, w: int, seed: int) -> torch.Tensor:
    return torch.randint(0, 256, (3, h, w), dtype=torch.uint8, generator=torch.Generator().manual_seed(seed))


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


ROUTES = {
    "region1": "<|region_token_start|><|x_2|><|y_5|><|region_token_end|><|im_end|>",
    "region2": "<|region_token_start|><|x_0|><|y_0|><|region_token_end|>"
               "<|region_token_start|><|x_6|><|x_7|><|y_3|><|region_token_end|><|im_end|>",
    **{b: BRANCHES[b].action_text for b in BRANCHES},
}


def second_round(session, tokenizer, model, row, img, route):
    """Append the tool output for `route` the way the graph does; return the reference encoder inputs."""
    if route.startswith("region"):
        parsed = parse_actions(ROUTES[route], (img.shape[2], img.shape[1]))
        crops = [crop(img, r.box) for r in parsed.regions]
        session.add_regions(row, crops)
        pv, grid = qwen_pixel_values([img, *crops], max_pixels=model.config.image_max_pixels)
        return dict(pixel_values=pv, image_grid_thw=grid)
    session.add_reencode(row, route, branch_features(model, route, [img])[0])
    pv, grid = qwen_pixel_values([img], max_pixels=model.config.image_max_pixels)
    return dict(pixel_values=pv, image_grid_thw=grid, **branch_inputs(route, img, model.config.reencode_max_pixels))


def stops(session: VPTSession) -> set[int]:
    return session.stop_ids | set(session.action_end_ids)


def run(model, tokenizer, imgs, questions, routes):
    """Round 1 forced to each row's route (None: free greedy), round 2 greedy. Returns per-row tokens
    and the reference inputs needed to recompute round 2."""
    session = VPTSession(model, tokenizer)
    session.start(imgs, questions)
    forced = {i: ids(tokenizer, ROUTES[r]) for i, r in enumerate(routes) if r}
    first = session.generate(NEW, forced=forced)
    refs, prefixes = {}, {}
    for i, route in enumerate(routes):
        if route:
            refs[i] = second_round(session, tokenizer, model, i, imgs[i], route)
            prefixes[i] = session.conversation(i)
        else:
            session.finish(i)
    second = session.generate(NEW)
    return session, first, second, refs, prefixes


@pytest.mark.parametrize("route", list(ROUTES))
def test_second_round_equals_reference_recompute(tiny, route):
    check_second_round(*tiny, route)


def check_second_round(model, tokenizer, route: str) -> None:
    """The round after `route`'s tool output equals recomputing the whole conversation the reference way."""
    img = image(90, 140, seed=1)
    session, first, second, refs, prefixes = run(model, tokenizer, [img], ["What is written on it?"], [route])
    assert first[0].stop == ("action" if route in BRANCHES else "eos")
    expected = recompute_greedy(model, prefixes[0], stop_ids=stops(session), max_new_tokens=NEW, suppressed=session.suppressed, **refs[0])
    assert second[0].token_ids == expected
    # stronger than argmax equality: the logits after the last cached token match a full recompute
    fed = torch.tensor([session.rows[0].ids])
    with torch.no_grad():
        full = model(input_ids=fed, position_ids=rope_index(model, fed, refs[0]["image_grid_thw"]), **refs[0])
    torch.testing.assert_close(session.rows[0].logits, full.logits[0, -1], rtol=1e-4, atol=1e-4)


def test_clip_reencodes_within_its_own_pixel_budget():
    """A model whose clip branch sees more pixels than its global view (`clip_max_pixels`): the
    re-encoding has more placeholders than the image, and the session still equals a recompute."""
    model, tokenizer = tiny_vpt_model(seed=0, image_max_pixels=56 * 56, clip_max_pixels=112 * 168)
    assert model.config.reencode_max_pixels == 112 * 168
    img = image(90, 140, seed=1)
    features = branch_features(model, "clip", [img])[0]
    seen = [int(qwen_pixel_values([img], max_pixels=budget)[1].prod()) // 4 for budget in (112 * 168, 56 * 56)]
    assert len(features) == seen[0] == 15 > seen[1] == 2  # 84x140 (3x5 merged) against the global 28x56
    check_second_round(model, tokenizer, "clip")
    default = tiny_vpt_model(seed=0, image_max_pixels=56 * 56)[0]
    assert default.config.reencode_max_pixels == 56 * 56  # without it: the global view's budget, as released


def test_first_round_greedy_equals_reference(tiny):
    model, tokenizer = tiny
    img = image(64, 200, seed=2)
    session = VPTSession(model, tokenizer)
    session.start([img], ["How many?"])
    prompt = session.conversation(0)
    turn = session.generate(NEW)[0]
    pv, grid = qwen_pixel_values([img])
    expected = recompute_greedy(model, prompt, stop_ids=stops(session), max_new_tokens=NEW, suppressed=session.suppressed,
                                pixel_values=pv, image_grid_thw=grid)
    assert turn.token_ids == expected


def test_batch_rows_equal_their_unbatched_runs(tiny):
    model, tokenizer = tiny
    imgs = [image(90, 140, 3), image(200, 60, 4), image(120, 120, 5), image(50, 300, 6)]
    questions = ["Which colour?", "Read the small text please", "Count", "Where?"]
    routes = ["region2", "dino", None, "clip"]
    _, first, second, _, _ = run(model, tokenizer, imgs, questions, routes)
    for i in range(len(imgs)):
        _, first1, second1, _, _ = run(model, tokenizer, [imgs[i]], [questions[i]], [routes[i]])
        assert first[i].token_ids == first1[0].token_ids
        assert (second.get(i) and second[i].token_ids) == (second1.get(0) and second1[0].token_ids)


def test_conditioning_comes_from_round_one_without_extra_forward(tiny):
    """The condition used for the features is the decode-time hidden state at the action start."""
    model, tokenizer = tiny
    img = image(80, 80, 7)
    session = VPTSession(model, tokenizer)
    session.start([img], ["q"])
    session.generate(3, forced={0: ids(tokenizer, BRANCHES["sam"].action_text)})
    prefix = session.conversation(0)[:-1]  # up to the action token
    with torch.no_grad():
        pv, grid = qwen_pixel_values([img])
        input_ids = torch.tensor([prefix])
        out = model(input_ids=input_ids, pixel_values=pv, image_grid_thw=grid,
                    position_ids=rope_index(model, input_ids, grid))
    torch.testing.assert_close(session.rows[0].conditions["sam"], out.last_hidden_state[0, -2], rtol=1e-4, atol=1e-5)


def test_bad_session_inputs(tiny):
    model, tokenizer = tiny
    session = VPTSession(model, tokenizer)
    with pytest.raises(InputMismatchError):
        session.start([image(40, 40, 0)], ["a", "b"])
    session.start([image(40, 40, 0)], ["a"])
    session.generate(2, forced={0: ids(tokenizer, "ab")})
    with pytest.raises(InputMismatchError, match="no dino action"):
        session.add_reencode(0, "dino", torch.zeros(256, 32))
    dino_only, tok = tiny_vpt_model(branches=("dino",))
    with pytest.raises(MissingBranchError):
        branch_features(dino_only, "sam", [image(40, 40, 0)])


def test_generation_cut_by_max_new_tokens_continues(tiny):
    """Two calls of n tokens give the same tokens as one call of 2n."""
    model, tokenizer = tiny
    img = image(70, 90, 8)
    one = VPTSession(model, tokenizer)
    one.start([img], ["Tell me more"])
    whole = one.generate(8)[0]
    two = VPTSession(model, tokenizer)
    two.start([img], ["Tell me more"])
    first = two.generate(4)[0]
    assert first.stop == "length" or first.token_ids == whole.token_ids
    rest = two.generate(4).get(0)
    joined = first.token_ids + (rest.token_ids if rest and first.stop == "length" else [])
    assert joined == whole.token_ids
