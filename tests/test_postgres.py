"""Runs checkpointed in a real PostgreSQL server (the ``postgres_dsn`` fixture): interrupted in one
process and resumed in another, through the async saver, and eight threads at once on one database
through a connection pool, each to the result of the same run without a checkpointer. The bundled
demo model answers (greedy, so every run of a question gives the same result); the runs take its own
route (a region), a forced region, a refused request asked again, or no perception."""
from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import threading
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.postgres.aio import AsyncPostgresSaver
from PIL import Image
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from vpt_agent import BadImageError, BadQuestionError, build_graph, result_json
from vpt_agent.data.synthetic import make_item
from vpt_agent.example import example

REGION = "<|region_token_start|><|x_{}|><|y_{}|><|region_token_end|><|im_end|>"
ROUTES: list[dict[str, Any]] = [
    {},  # the model's own route
    {"force": [REGION.format(5, 2)]},
    {"force": ["<|clip_action_start|><|clip_action|><|clip_action_end|>"]},  # the demo model has no clip branch
    {"mode": "direct"},
]
EXAMPLE = example()
ITEMS = [make_item(11, i) for i in (0, 1, 2, 4, 5, 6, 8)]  # distinct questions about distinct scenes
RUNS: list[tuple[dict[str, Any], dict[str, Any]]] = [  # (input, options) per run
    (inputs, ROUTES[k % len(ROUTES)])
    for k, inputs in enumerate([{"image": str(EXAMPLE.image), "q": EXAMPLE.question},
                                *({"image": item.image, "q": item.question} for item in ITEMS)])
]
SESSION = uuid.uuid4().hex[:8]  # thread ids of this session only, should the database be a reused one
README = (Path(__file__).resolve().parents[1] / "README.md").read_text()

RESUME = """
import json, os, sys
from langgraph.checkpoint.postgres import PostgresSaver
from vpt_agent import BadImageError, BadQuestionError, build_graph, result_json

dsn, threads = sys.argv[1], json.loads(sys.argv[2])
out = {}
with PostgresSaver.from_conn_string(dsn) as saver:
    graph = build_graph(checkpointer=saver)
    for thread, options in threads.items():
        config = {"configurable": {"thread_id": thread, **options}}
        out[thread] = {"next": list(graph.get_state(config).next), "result": result_json(graph.invoke(None, config))}
print(json.dumps({"pid": os.getpid(), "runs": out}))
"""


def comparable(result: dict[str, Any]) -> dict[str, Any]:
    """The JSON result without timings."""
    steps = [{k: v for k, v in step.items() if k != "duration_ms"} for step in result["steps"]]
    return {**result_json(result), "steps": steps}


def config(thread: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"configurable": {"thread_id": f"{SESSION}-{thread}", **options}}


@pytest.fixture(scope="module")
def expected() -> list[dict[str, Any]]:
    """Each run, uninterrupted and without a checkpointer."""
    graph = build_graph()
    results = [comparable(graph.invoke(inputs, {"configurable": options})) for inputs, options in RUNS]
    assert all(r["answer"] and r["error"] is None for r in results)
    routes = [tuple(step["node"] for step in r["steps"]) for r in results]
    assert len(set(routes)) >= 3 and all("crop" in route for route in routes[:2])
    return results


def test_a_run_interrupted_in_one_process_resumes_in_another(postgres_dsn, expected):
    runs = {f"{SESSION}-resume-{k}": k for k in (0, 2)}  # a region; a refused request, asked again, then a region
    with PostgresSaver.from_conn_string(postgres_dsn) as saver:
        saver.setup()
        graph = build_graph(checkpointer=saver)
        for thread, k in runs.items():
            inputs, options = RUNS[k]
            graph.invoke(inputs, {"configurable": {"thread_id": thread, **options}}, interrupt_after=["mllm"])

        threads = json.dumps({thread: RUNS[k][1] for thread, k in runs.items()})
        done = subprocess.run([sys.executable, "-c", RESUME, postgres_dsn, threads],
                              capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        resumed = json.loads(done.stdout)
        assert resumed["pid"] != os.getpid()
        for thread, k in runs.items():
            assert resumed["runs"][thread]["next"] == [expected[k]["steps"][2]["node"]], thread
            assert comparable(resumed["runs"][thread]["result"]) == expected[k], thread
            state = graph.get_state({"configurable": {"thread_id": thread}})  # what the other process wrote
            assert state.next == () and comparable(state.values) == expected[k], thread


def test_the_async_saver_interrupts_and_resumes(postgres_dsn, expected):
    async def interrupted_then_resumed(saver: AsyncPostgresSaver, k: int) -> tuple[tuple, dict]:
        inputs, options = RUNS[k]
        run_config = config(f"async-{k}", options)
        await build_graph(checkpointer=saver).ainvoke(inputs, run_config, interrupt_after=["mllm"])
        fresh = build_graph(checkpointer=saver)  # a new store: the KV cache is rebuilt from the checkpoint
        stopped_at = (await fresh.aget_state(run_config)).next
        return stopped_at, await fresh.ainvoke(None, run_config)

    async def main() -> list[tuple[tuple, dict]]:
        async with AsyncPostgresSaver.from_conn_string(postgres_dsn) as saver:
            await saver.setup()
            return await asyncio.gather(*(interrupted_then_resumed(saver, k) for k in (1, 4)))

    for (stopped_at, result), k in zip(asyncio.run(main()), (1, 4)):
        assert stopped_at == (expected[k]["steps"][2]["node"],)
        assert comparable(result) == expected[k]


def test_threads_at_once_on_one_database_keep_their_own_runs(postgres_dsn, expected):
    settings = {"autocommit": True, "prepare_threshold": 0, "row_factory": dict_row}  # what PostgresSaver needs
    with ConnectionPool(postgres_dsn, max_size=len(RUNS), kwargs=settings) as pool:
        saver = PostgresSaver(pool)
        saver.setup()
        graph = build_graph(checkpointer=saver)
        start = threading.Barrier(len(RUNS), timeout=60)

        def ask(k: int) -> dict[str, Any]:
            inputs, options = RUNS[k]
            start.wait()
            graph.invoke(inputs, config(f"pool-{k}", options), interrupt_after=["mllm"])
            return graph.invoke(None, config(f"pool-{k}", options))

        with ThreadPoolExecutor(len(RUNS)) as threads:
            results = list(threads.map(ask, range(len(RUNS))))
        assert [comparable(result) for result in results] == expected

        for k, (inputs, _) in enumerate(RUNS):
            history = list(graph.get_state_history(config(f"pool-{k}", {})))
            assert {snapshot.values.get("q") for snapshot in history} - {None} == {inputs["q"]}, k
            assert comparable(history[0].values) == expected[k], k


def test_readme_postgres_examples(postgres_dsn, tmp_path, monkeypatch):
    """The "### Postgres" snippets (fenced as ``py``, so that test_graph_readme.py leaves them to this
    test) run as written against the fixture's server, in a folder holding photo.png."""
    start = README.index("### Postgres\n")
    snippets = re.findall(r"```py\n(.*?)```", README[start : README.index("\n## ", start)], flags=re.S)
    assert len(snippets) == 2
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    answer = build_graph().invoke({"image": "photo.png", "q": "What is written on the sign?"})["answer"]

    for code in snippets:
        code = code.replace("postgresql://user:password@localhost:5432/vpt", postgres_dsn)
        code = code.replace('"photo-', f'"{SESSION}-photo-')  # this session's threads only
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), {"__name__": "readme_example"})
        assert out.getvalue().splitlines() and set(out.getvalue().splitlines()) == {answer}


def test_a_nul_character_is_a_typed_error_before_anything_is_stored(postgres_dsn):
    """PostgreSQL's JSON holds no NUL, and LangGraph saves the input before `perceive` can refuse it."""
    with PostgresSaver.from_conn_string(postgres_dsn) as saver:
        saver.setup()
        graph = build_graph(checkpointer=saver)
        with pytest.raises(BadQuestionError, match="NUL"):
            graph.invoke({"image": str(EXAMPLE.image), "q": "What\x00?"}, config("nul-q", {}))
        with pytest.raises(BadImageError, match="NUL"):
            graph.invoke({"image": "photo\x00.png", "q": "What?"}, config("nul-image", {}))
        assert graph.get_state(config("nul-q", {})).values == {}
