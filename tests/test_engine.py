"""The batching engine: rows that join and leave a batch mid-decode get the tokens of their solo runs,
a fault ends only its own round, cancelled and finished rounds leave nothing behind, and every
graph and caller on one model shares one engine bounded by `max_batch_rows`."""
from __future__ import annotations

import asyncio
import gc
import time
import weakref
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from langgraph.checkpoint.memory import InMemorySaver

from vpt_agent import ModelError, build_graph
from vpt_agent.model.batch import Batch, Round
from vpt_agent.model.conversation import Conversation
from vpt_agent.model.engine import engine_for
from vpt_agent.model.tiny import tiny_vpt_model
from vpt_agent.perception.crop import crops
from vpt_agent.perception.reencode import branch_features
from vpt_agent.prompts import build_question
from vpt_agent.tokens import BRANCHES, parse_actions

REGION = "<|region_token_start|><|x_1|><|y_2|><|region_token_end|><|im_end|>"
TWO_REGIONS = "<|region_token_start|><|x_0|><|y_0|><|region_token_end|>" + REGION
MALFORMED = "<|region_token_start|><|x_3|><|region_token_end|><|im_end|>"
SCRIPTS = {
    # per round: forced text, then greedy decoding up to the budget; what follows an action round
    # is the user turn the graph would add (crops, features, the question again)
    "answer": [("", 12)],
    "region": [(REGION, 0), ("", 9)],
    "two regions": [(TWO_REGIONS, 0), ("", 7)],
    "dino": [(BRANCHES["dino"].action_text, 0), ("", 8)],
    "sam": [(BRANCHES["sam"].action_text, 0), ("", 6)],
    "clip": [(BRANCHES["clip"].action_text, 0), ("", 10)],
    "re-ask": [(MALFORMED, 0), ("", 8)],
    "cut": [("", 3), ("", 5)],  # a round cut by its token budget goes on in the next one
}


@pytest.fixture(scope="module")
def tiny():
    return tiny_vpt_model()


def image(seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    height, width = (int(v) for v in torch.randint(30, 90, (2,), generator=generator))
    return torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator)


class Scripted:
    """One conversation following `SCRIPTS[name]`: its rounds, the user turns between them."""

    def __init__(self, tiny, name: str, seed: int) -> None:
        model, tokenizer = tiny
        self.name, self.rounds_left, self.image = name, list(SCRIPTS[name]), image(seed)
        self.question = build_question(f"What is on picture {seed}?", "region")
        self.conversation = Conversation(model, tokenizer)
        self.conversation.start(self.image, self.question)
        self.turns: list[list[int]] = []

    def next_round(self) -> Round:
        text, budget = self.rounds_left.pop(0)
        forced = self.conversation.tokenizer(text, add_special_tokens=False)["input_ids"]
        return Round(self.conversation, len(forced) + budget, forced=forced)

    def ended(self, round_: Round) -> bool:
        """Record the round; add the user turn that follows it. Whether the conversation is over."""
        assert round_.error is None, round_.error
        self.turns.append(list(round_.tokens))
        if not self.rounds_left:
            return True
        text = round_.turn().text
        parsed = parse_actions(text, (self.image.shape[2], self.image.shape[1]))
        if parsed.kind == "region":
            self.conversation.add_regions(crops(self.image, [r.box for r in parsed.regions]))
        elif parsed.kind == "reencode":
            branch = parsed.reencode.branch
            features = branch_features(self.conversation.model, branch, [self.image])[0]
            self.conversation.add_reencode(branch, features)
        elif parsed.kind == "error":
            self.conversation.add_text(self.question)
        return False


def drive(model, scripted: list[Scripted], join_steps: list[int], decoder=None) -> None:
    """All conversations in one batch (decoding over `decoder`'s static cache if given): each joins at
    its step, and after each round its next round joins at the next step, while the others decode."""
    batch, step, owners = Batch(model, decoder), 0, {}
    due = dict(enumerate(join_steps))
    with torch.no_grad():
        while due or batch.rounds:
            joining = []
            for i in [i for i, at in sorted(due.items()) if at <= step]:
                del due[i]
                round_ = scripted[i].next_round()
                owners[id(round_)] = i
                joining.append(round_)
            assert batch.join(joining) == []
            for round_ in batch.step():
                i = owners.pop(id(round_))
                if not scripted[i].ended(round_):
                    due[i] = step + 1
            step += 1


def test_rows_joining_and_leaving_mid_decode_get_their_solo_tokens(tiny):
    solo = check_solo_tokens(tiny)
    names = list(SCRIPTS)
    assert solo[names.index("cut")][0] != [] and len(solo[names.index("cut")][0]) == 3
    assert len({len(turn) for s in solo for turn in s}) > 3  # rounds of different lengths: rows leave apart


def check_solo_tokens(tiny) -> list[list[list[int]]]:
    """Every script run alone, then all in one batch joining at different steps: the same tokens.
    Returns the solo turns, per script."""
    model, _ = tiny
    solo = []
    for seed, name in enumerate(SCRIPTS):
        one = Scripted(tiny, name, seed)
        drive(model, [one], [0])
        solo.append(one.turns)
    together = [Scripted(tiny, name, seed) for seed, name in enumerate(SCRIPTS)]
    drive(model, together, join_steps=[0, 0, 1, 2, 2, 3, 5, 6])
    assert [s.turns for s in together] == solo
    return solo


def test_a_round_whose_prefill_fails_fails_alone(tiny):
    model, tokenizer = tiny
    good = [Scripted(tiny, "answer", seed) for seed in (1, 2)]
    expected = []
    for seed in (1, 2):
        one = Scripted(tiny, "answer", seed)
        drive(model, [one], [0])
        expected.append(one.turns[0])
    bad = Conversation(model, tokenizer)
    bad.start(image(3), "q")
    batch = Batch(model)
    with torch.no_grad():
        batch.join([Round(bad, 3, forced=tokenizer(BRANCHES["dino"].action_text)["input_ids"])])
        while batch.rounds:
            batch.step()
    bad.add_reencode("dino", torch.zeros(100, 32))  # 100 feature rows for 256 placeholders
    rounds = [Round(bad, 5)] + [s.next_round() for s in good]
    with torch.no_grad():
        failed = batch.join(rounds)
        assert failed == [rounds[0]] and "256" in str(rounds[0].error) and len(batch) == 2
        while batch.rounds:
            batch.step()
    assert [r.tokens for r in rounds[1:]] == expected


def test_a_failed_decode_step_is_retried_without_changing_any_row(tiny, monkeypatch):
    model, _ = tiny
    expected = []
    for seed in range(3):
        one = Scripted(tiny, "answer", seed)
        drive(model, [one], [0])
        expected.append(one.turns)
    calls, forward = [], type(model).forward

    def flaky(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape)
        if len(calls) == 4:  # a decode step of all three rows, mid-generation
            raise RuntimeError("out of memory")
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(type(model), "forward", flaky)
    together = [Scripted(tiny, "answer", seed) for seed in range(3)]
    drive(model, together, [0, 0, 0])
    assert calls[3] == (3, 1) and [s.turns for s in together] == expected


def test_a_cancelled_task_leaves_the_batch_and_the_others_go_on(tiny):
    model, tokenizer = tiny
    engine = engine_for(model)
    solo = Scripted(tiny, "answer", 5)
    drive(model, [solo], [0])

    async def main() -> list[int]:
        long = Conversation(model, tokenizer)
        long.start(image(4), "Say a lot")
        endless = asyncio.create_task(engine.agenerate(Round(long, 400, forced=[0] * 400)))
        for _ in range(5000):  # until it decodes
            if engine.rows:
                break
            await asyncio.sleep(0.001)
        other = asyncio.create_task(engine.agenerate(Scripted(tiny, "answer", 5).next_round()))
        endless.cancel()
        with pytest.raises(asyncio.CancelledError):
            await endless
        return (await other).token_ids

    assert asyncio.run(main()) == solo.turns[0]
    for _ in range(5000):  # the engine drops the cancelled row at its next step
        if not engine.rows:
            break
        time.sleep(0.001)
    assert engine.rows == 0


def graph_runs(n: int) -> list[tuple[dict, dict]]:
    rng = np.random.default_rng(7)
    forces = [[REGION], [BRANCHES["dino"].action_text], [BRANCHES["clip"].action_text], [MALFORMED], []]
    return [({"image": rng.integers(0, 256, (40 + i, 60, 3), dtype=np.uint8), "q": f"Question {i}?"},
             {"configurable": {"force": forces[i % len(forces)]}}) for i in range(n)]


def comparable(result: dict) -> dict:
    steps = [{k: v for k, v in step.items() if k != "duration_ms"} for step in result["steps"]]
    return {**{k: v for k, v in result.items() if k != "image"}, "steps": steps}


def test_faults_in_some_runs_leave_the_others_alone(tiny, monkeypatch):
    model, tokenizer = tiny
    graph = build_graph(model, tokenizer=tokenizer, max_new_tokens=5)
    runs = graph_runs(10)
    expected = [comparable(graph.invoke(*run)) for run in runs]
    runs[3] = ({"image": b"not an image", "q": "Question 3?"}, runs[3][1])  # fails in perceive
    poisoned = runs[6][0]["image"].shape[0]  # a dino run whose encoder raises
    encode = branch_features

    def failing(model, branch, images):
        if any(image.shape[1] == poisoned for image in images):
            raise RuntimeError("encoder out of memory")
        return encode(model, branch, images)

    monkeypatch.setattr("vpt_agent.model.engine.branch_features", failing)
    results = graph.batch([r[0] for r in runs], [r[1] for r in runs], return_exceptions=True)
    assert results[3]["error"].startswith("BadImageError")
    assert isinstance(results[6], ModelError) and "encoder out of memory" in str(results[6])
    assert [comparable(r) for i, r in enumerate(results) if i not in (3, 6)] == \
        [e for i, e in enumerate(expected) if i not in (3, 6)]


def test_finished_and_failed_runs_leave_no_tensors(tiny, monkeypatch):
    model, tokenizer = tiny
    made: list[weakref.ref] = []

    class Tracked(Conversation):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, **kwargs)
            made.append(weakref.ref(self))

    monkeypatch.setattr("vpt_agent.nodes.Conversation", Tracked)
    graph = build_graph(model, tokenizer=tokenizer, max_new_tokens=5)
    runs = graph_runs(6)
    runs[2][1]["configurable"]["force"] = ["<|seg_action_start|><|seg_action|><|seg_action_end|>"]
    def failing(model, branch, images):
        raise RuntimeError("encoder out of memory")

    monkeypatch.setattr("vpt_agent.model.engine.branch_features", failing)
    results = graph.batch([r[0] for r in runs], [r[1] for r in runs], return_exceptions=True)
    assert sum(isinstance(r, ModelError) for r in results) == 2  # the dino and sam runs failed
    store = graph.nodes["mllm"].bound.func.__self__.store
    del results  # a caller holding an exception holds what its traceback's frames hold
    gc.collect()
    assert len(made) == 6 and [ref() for ref in made] == [None] * 6
    assert len(store) == 0 and engine_for(model).rows == 0


def test_max_batch_rows_bounds_every_step(tiny, monkeypatch):
    model, tokenizer = tiny
    graph = build_graph(model, tokenizer=tokenizer, max_new_tokens=5, max_batch_rows=2)
    runs = graph_runs(7)
    expected = [comparable(graph.invoke(*run)) for run in runs]
    widths, step = [], Batch.step

    def recording(self):
        widths.append(len(self.rounds))
        return step(self)

    monkeypatch.setattr(Batch, "step", recording)
    try:
        results = graph.batch([r[0] for r in runs], [r[1] for r in runs])
    finally:
        engine_for(model).configure(max_rows=64)
    assert [comparable(r) for r in results] == expected
    assert max(widths) == 2


def test_graphs_on_one_model_share_its_engine(tiny):
    model, tokenizer = tiny
    region = build_graph(model, tokenizer=tokenizer, max_new_tokens=5)
    direct = build_graph(model, tokenizer=tokenizer, max_new_tokens=5, mode="direct")
    assert region.nodes["mllm"].bound.func.__self__.engine is direct.nodes["mllm"].bound.func.__self__.engine
    runs = graph_runs(6)
    expected = [comparable(g.invoke(*run)) for g in (region, direct) for run in runs]
    with ThreadPoolExecutor(12) as pool:
        results = list(pool.map(lambda job: comparable(job[0].invoke(*job[1])),
                                [(g, run) for g in (region, direct) for run in runs]))
    assert results == expected


def test_a_run_interrupted_by_its_checkpointer_leaves_the_others_alone(tiny):
    model, tokenizer = tiny
    graph = build_graph(model, InMemorySaver(), tokenizer=tokenizer, max_new_tokens=5)
    runs = graph_runs(6)
    configs = [{**config, "configurable": {**config["configurable"], "thread_id": f"t{i}"}}
               for i, (_, config) in enumerate(runs)]
    expected = [comparable(build_graph(model, tokenizer=tokenizer, max_new_tokens=5).invoke(*run)) for run in runs]

    def ask(i: int) -> dict:
        stop = ["mllm"] if i == 2 else None  # stops after its first round, while the others decode
        return graph.invoke(runs[i][0], configs[i], interrupt_after=stop)

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(ask, range(6)))
    assert graph.get_state(configs[2]).next and results[2]["steps"][-1]["node"] == "mllm"
    assert [comparable(r) for i, r in enumerate(results) if i != 2] == [e for i, e in enumerate(expected) if i != 2]
    assert comparable(graph.invoke(None, configs[2])) == expected[2]  # resumed to its own answer


def test_placement_and_a_model_moved_after_the_graph_was_built(checkpoint, tmp_path):
    """A path loads where asked (bf16 on the CPU here); a model moved to another dtype between runs,
    and while a run waits between two nodes, goes on working."""
    graph = build_graph(str(checkpoint), dtype="bfloat16", force=[REGION, "It is fine.<|im_end|>"])
    model = graph.nodes["mllm"].bound.func.__self__.model
    assert next(model.parameters()).dtype == torch.bfloat16
    image = np.random.default_rng(3).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    assert graph.invoke({"image": image, "q": "What?"})["answer"] == "It is fine."
    saver = build_graph(model, InMemorySaver(), tokenizer=graph.nodes["mllm"].bound.func.__self__.tokenizer,
                        force=[REGION, "It is"], max_new_tokens=3)
    config = {"configurable": {"thread_id": "moved"}}
    saver.invoke({"image": image, "q": "What?"}, config, interrupt_after=["crop"])  # its cache parked in bf16
    model.to(torch.float32)
    result = saver.invoke(None, config)
    assert result["steps"][-2]["text"].startswith("It is") and next(model.parameters()).dtype == torch.float32
