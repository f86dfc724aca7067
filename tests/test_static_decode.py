"""Decoding over a static KV cache (`compile=True`): the tokens of the dynamic path for every route,
whatever joins or leaves and whichever shape bucket the cache moves to; compiled steps equal eager ones."""
from __future__ import annotations

import pytest

from vpt_agent import build_graph
from vpt_agent.model import static_decode
from vpt_agent.model.static_decode import StaticDecoder
from vpt_agent.model.tiny import tiny_vpt_model

from test_engine import SCRIPTS, Scripted, drive, image


@pytest.fixture(scope="module")
def tiny():
    return tiny_vpt_model()


def solo_runs(tiny, names):
    runs = []
    for seed, name in enumerate(names):
        one = Scripted(tiny, name, seed)
        drive(tiny[0], [one], [0])
        runs.append(one.turns)
    return runs


def test_static_decoding_gives_the_dynamic_tokens_for_every_route_across_buckets(tiny, monkeypatch):
    monkeypatch.setattr(static_decode, "MIN_COLUMNS", 16)  # small buckets: the cache moves between them
    names = list(SCRIPTS)
    decoder = StaticDecoder(tiny[0])
    assert not decoder.compiled  # CPU: eager static steps
    together = [Scripted(tiny, name, seed) for seed, name in enumerate(names)]
    drive(tiny[0], together, join_steps=[0, 0, 1, 2, 2, 3, 5, 6], decoder=decoder)
    assert [s.turns for s in together] == solo_runs(tiny, names)
    assert len({rows for rows, _ in decoder._buckets}) > 2 and len({cols for _, cols in decoder._buckets}) > 1


def test_compiled_steps_give_the_eager_tokens(tiny):
    names = ["dino", "region"]  # a conditioned action token fed; two row buckets: two compiles
    decoder = StaticDecoder(tiny[0], compile=True)  # inductor on the CPU (CUDA graphs on a GPU)
    together = [Scripted(tiny, name, seed) for seed, name in enumerate(names)]
    drive(tiny[0], together, join_steps=[0, 0], decoder=decoder)
    assert [s.turns for s in together] == solo_runs(tiny, names)


def test_build_graph_compile_answers_as_without():
    answers = {}
    for compile in (False, True):
        model, tokenizer = tiny_vpt_model(seed=1)
        graph = build_graph(model, tokenizer=tokenizer, compile=compile, max_new_tokens=12)
        runs = [{"image": image(seed), "q": f"What is on picture {seed}?"} for seed in range(6)]
        answers[compile] = [(r["answer"], r["actions"], r["error"]) for r in graph.batch(runs)]
        assert bool(static_decode._DECODERS.get(model)) == compile
    assert answers[True] == answers[False]
