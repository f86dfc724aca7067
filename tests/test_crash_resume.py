"""A run killed with SIGKILL at a node boundary resumes from its SqliteSaver checkpoint in a new
process, to the answer of an uninterrupted run.

One driver process loads the model, then forks one child per scenario; the child runs the graph
on SqliteSaver and kills itself on entering the scenario's node, after the previous node's
checkpoint was written (``durability="sync"``; with the default "async" the last checkpoint may
still be in flight, and the run resumes from the one before). A fresh interpreter then resumes
every thread with ``graph.invoke(None, config)``.
"""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from vpt_agent import build_graph, result_json
from vpt_agent.model.tiny import tiny_vpt_model

REGION = "<|region_token_start|><|x_1|><|y_2|><|region_token_end|><|im_end|>"
DINO = "<|detection_action_start|><|detection_action|><|detection_action_end|>"
SAM = "<|seg_action_start|><|seg_action|><|seg_action_end|>"
CLIP = "<|clip_action_start|><|clip_action|><|clip_action_end|>"
MALFORMED = "<|region_token_start|><|x_3|><|region_token_end|><|im_end|>"
PREFIX = "It is"
Q = "What is it?"
# boundary: (forced rounds, node killed on entry, which entry of that node)
SCENARIOS = {
    "after perceive": ([REGION, PREFIX], "mllm", 1),
    "after mllm, before crop": ([REGION, PREFIX], "crop", 1),
    "after mllm, before dino": ([DINO, PREFIX], "dino", 1),
    "after crop": ([REGION, PREFIX], "mllm", 2),
    "after dino": ([DINO, PREFIX], "mllm", 2),
    "after sam": ([SAM, PREFIX], "mllm", 2),
    "after a refused request": ([MALFORMED, PREFIX], "mllm", 2),
    "after crop, before clip": ([REGION, CLIP, PREFIX], "clip", 1),
    "before answer": ([REGION, CLIP, PREFIX], "answer", 1),
}
DURABILITY = ("sync", "async")

PRELUDE = """
import json, sqlite3, sys
import numpy as np
import torch
from langgraph.checkpoint.sqlite import SqliteSaver
from vpt_agent import build_graph, result_json
from vpt_agent.model.tiny import tiny_vpt_model

torch.set_num_threads(1)  # no thread pool before fork
db, scenarios, image = sys.argv[1], json.loads(sys.argv[2]), np.load(sys.argv[3])
model, tokenizer = tiny_vpt_model()
"""

CRASH = PRELUDE + """
import functools, os, signal
from collections import Counter
from langgraph.config import get_config
from vpt_agent.nodes import VPTNodes


def die_on_entry(node, nth):
    seen = Counter()
    for name in ("mllm", "crop", "reencode", "answer"):
        @functools.wraps(getattr(VPTNodes, name))
        def entered(self, state, _method=getattr(VPTNodes, name), **kwargs):
            current = get_config()["metadata"]["langgraph_node"]
            seen[current] += 1
            if (current, seen[current]) == (node, nth):
                os.kill(os.getpid(), signal.SIGKILL)
            return _method(self, state, **kwargs)
        setattr(VPTNodes, name, entered)


killed = {}
for thread, (force, node, nth, durability) in scenarios.items():
    pid = os.fork()
    if pid == 0:
        die_on_entry(node, nth)
        saver = SqliteSaver(sqlite3.connect(db, check_same_thread=False))
        graph = build_graph(model, saver, tokenizer=tokenizer, force=force, max_new_tokens=6)
        config = {"configurable": {"thread_id": thread}}
        graph.invoke({"image": image, "q": sys.argv[4]}, config, durability=durability)
        os._exit(0)  # not killed: the test fails
    _, status = os.waitpid(pid, 0)
    killed[thread] = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
print(json.dumps(killed))
"""

RESUME = PRELUDE + """
saver = SqliteSaver(sqlite3.connect(db, check_same_thread=False))
out = {}
for thread, (force, *_) in scenarios.items():
    graph = build_graph(model, saver, tokenizer=tokenizer, force=force, max_new_tokens=6)
    config = {"configurable": {"thread_id": thread}}
    stopped_before = list(graph.get_state(config).next)
    out[thread] = {"next": stopped_before, "result": result_json(graph.invoke(None, config))}
print(json.dumps(out))
"""


def comparable(result: dict) -> dict:
    steps = [{k: v for k, v in step.items() if k != "duration_ms"} for step in result["steps"]]
    return {**result_json(result), "steps": steps}


def python(script: str, *args: str) -> dict:
    done = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


@pytest.mark.skipif(sys.platform == "win32", reason="needs fork and SIGKILL")
def test_killed_runs_resume_to_the_same_answer_in_a_new_process(tmp_path):
    image = np.random.default_rng(1).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    np.save(tmp_path / "image.npy", image)
    model, tokenizer = tiny_vpt_model()
    expected = {}
    for name, (force, _, _) in SCENARIOS.items():
        graph = build_graph(model, tokenizer=tokenizer, force=force, max_new_tokens=6)
        expected[name] = comparable(graph.invoke({"image": image, "q": Q}))
    runs = {f"{name} ({mode})": [*SCENARIOS[name], mode] for name in SCENARIOS for mode in DURABILITY}
    args = (str(tmp_path / "runs.sqlite"), json.dumps(runs), str(tmp_path / "image.npy"))

    killed = python(CRASH, *args, Q)
    assert killed == {thread: True for thread in runs}
    resumed = python(RESUME, *args)
    for thread, (force, node, _, mode) in runs.items():
        name = thread.removesuffix(f" ({mode})")
        assert comparable(resumed[thread]["result"]) == expected[name], thread
        assert [s["text"] for s in expected[name]["steps"] if s["node"] == "mllm"][-1].startswith(PREFIX)
        if mode == "sync":  # the checkpoint stands exactly at the boundary
            assert resumed[thread]["next"] == [node], thread
    nodes = [step["node"] for step in expected["before answer"]["steps"]]
    assert nodes == ["perceive", "mllm", "crop", "mllm", "clip", "mllm", "answer"]
