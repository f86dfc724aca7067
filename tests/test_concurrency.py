"""One loaded model shared by many threads and tasks: every run gives its single-threaded result.

50 questions, each with its own image and a route (one or two regions, dino, sam, clip, a malformed
request asked again, a round cut by its token budget, or none; forced per run through
``config["configurable"]``), run by 8 threads at once, each thread through all 50 in its own
order; then all 50 through `graph.batch`, and as 50 asyncio tasks. Their rounds share the model's
batching engine, so rows join and leave its batch mid-decode. The results are compared whole
(image, steps, texts, regions, answer), timings aside: a run that saw another run's image, crop,
features or KV cache would answer differently.
"""
from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch

from vpt_agent import build_graph
from vpt_agent.model.engine import engine_for
from vpt_agent.model.tiny import tiny_vpt_model

THREADS, QUESTIONS = 8, 50
REGION = "<|region_token_start|><|x_{}|><|y_{}|><|region_token_end|><|im_end|>"
ROUTES = [
    lambda i: {"force": [REGION.format(i % 8, i // 8 % 8)]},
    lambda i: {"force": [REGION.format(i % 8, 1).replace("<|im_end|>", "") + REGION.format(7 - i % 8, 6)]},
    lambda i: {"force": ["<|detection_action_start|><|detection_action|><|detection_action_end|>"]},
    lambda i: {"force": ["<|seg_action_start|><|seg_action|><|seg_action_end|>"]},
    lambda i: {"force": ["<|clip_action_start|><|clip_action|><|clip_action_end|>"]},
    lambda i: {"force": ["<|region_token_start|><|x_3|><|region_token_end|><|im_end|>"]},  # malformed: asked again
    lambda i: {"force": [], "max_new_tokens": 2},  # a round cut by its token budget
    lambda i: {"force": []},  # the model answers at once (or asks for what it likes)
]


def questions() -> list[tuple[dict, dict]]:
    """(input, config) per question: a random image of a random size, a numbered question, a route."""
    rng = np.random.default_rng(0)
    out = []
    for i in range(QUESTIONS):
        height, width = rng.integers(20, 90, 2)
        image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
        config = {"configurable": ROUTES[i % len(ROUTES)](i)}
        out.append(({"image": image, "q": f"Question {i}: what is here?"}, config))
    return out


def comparable(result: dict) -> dict:
    """The result without timings, and without the image (the caller's own array, as given)."""
    steps = [{k: v for k, v in step.items() if k != "duration_ms"} for step in result["steps"]]
    return {**{k: v for k, v in result.items() if k != "image"}, "steps": steps}


@pytest.fixture
def one_thread_per_op():
    """Intra-op threads oversubscribe the 2 CPU cores the suite shares (a run took 40x longer)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_threads_and_batch_give_single_threaded_answers(one_thread_per_op, stores):
    model, tokenizer = tiny_vpt_model()
    graph = build_graph(model, tokenizer=tokenizer, max_new_tokens=4)
    runs = questions()

    start = time.perf_counter()
    expected = [comparable(graph.invoke(inputs, config)) for inputs, config in runs]
    single = time.perf_counter() - start
    assert len({r["steps"][-2]["text"] for r in expected}) >= 10  # the last rounds tell the images apart
    assert {r["steps"][2]["node"] for r in expected} >= {"crop", "dino", "sam", "clip", "mllm", "answer"}  # every route
    assert any(len(r["regions"]) == 2 for r in expected) and any(r["warnings"] for r in expected)

    def ask_all(worker: int) -> list[tuple[int, dict]]:
        order = np.random.default_rng(worker).permutation(QUESTIONS)
        return [(int(i), comparable(graph.invoke(*runs[i]))) for i in order]

    start = time.perf_counter()
    with ThreadPoolExecutor(THREADS) as pool:
        answered = [pair for pairs in pool.map(ask_all, range(THREADS)) for pair in pairs]
    threaded = time.perf_counter() - start
    mismatches = [i for i, result in answered if result != expected[i]]
    assert len(answered) == THREADS * QUESTIONS and mismatches == []

    start = time.perf_counter()
    batched = graph.batch([inputs for inputs, _ in runs], [config for _, config in runs])
    batch = time.perf_counter() - start
    assert [comparable(r) for r in batched] == expected

    async def ask_at_once() -> list[dict]:
        return await asyncio.gather(*(graph.ainvoke(inputs, config) for inputs, config in runs))

    start = time.perf_counter()
    tasks = asyncio.run(ask_at_once())
    concurrent_tasks = time.perf_counter() - start
    assert [comparable(r) for r in tasks] == expected
    assert len(stores[0]) == 0 and engine_for(model).rows == 0  # every run freed its tensors
    print(f"\n1 thread x {QUESTIONS}: {single:.1f} s; {THREADS} threads x {QUESTIONS}: {threaded:.1f} s; "
          f"batch of {QUESTIONS}: {batch:.1f} s; {QUESTIONS} tasks: {concurrent_tasks:.1f} s")
