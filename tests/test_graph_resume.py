"""Runs interrupted between nodes resume from a SqliteSaver checkpoint in a new process, to the
same answer: the new process has no KV cache, no crops and no features, only the checkpoint."""
from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from contextlib import closing

import numpy as np
from langgraph.checkpoint.sqlite import SqliteSaver
from PIL import Image

from vpt_agent import build_graph
from vpt_agent.model.tiny import tiny_vpt_model

REGION = "<|region_token_start|><|x_1|><|y_2|><|region_token_end|><|im_end|>"
DINO = "<|detection_action_start|><|detection_action|><|detection_action_end|>"
CLIP = "<|clip_action_start|><|clip_action|><|clip_action_end|>"
PREFIX = "It is"
# thread -> (forced rounds, node after which the first process stops)
SCENARIOS = {
    "region": ([REGION, PREFIX], "crop"),
    "dino": ([DINO, PREFIX], "dino"),
    "region-then-clip": ([REGION, CLIP, PREFIX], "clip"),
    "before-any-tool": ([REGION, PREFIX], "mllm"),
}

RESUME = """
import json, sqlite3, sys
from langgraph.checkpoint.sqlite import SqliteSaver
from vpt_agent import build_graph, result_json
from vpt_agent.model.tiny import tiny_vpt_model

model, tokenizer = tiny_vpt_model()
saver = SqliteSaver(sqlite3.connect(sys.argv[1], check_same_thread=False))
out = {}
for thread, force in json.loads(sys.argv[2]).items():
    graph = build_graph(model, saver, tokenizer=tokenizer, force=force, max_new_tokens=6)
    out[thread] = result_json(graph.invoke(None, {"configurable": {"thread_id": thread}}))
print(json.dumps(out))
"""


def _comparable(result: dict) -> dict:
    return {
        "answer": result["answer"],
        "actions": result["actions"],
        "regions": result["regions"],
        "error": result["error"],
        "steps": [(s["node"], s["text"], s["boxes"], s["feature_shape"]) for s in result["steps"]],
    }


def test_resume_from_sqlite_in_a_new_process(tmp_path):
    model, tokenizer = tiny_vpt_model()
    pixels = np.random.default_rng(1).integers(0, 256, (56, 84, 3), dtype=np.uint8)
    inputs = {"image": Image.fromarray(pixels), "q": "What is it?"}  # a PIL image: checkpointed as PNG
    db = tmp_path / "runs.sqlite"

    expected = {}
    with closing(sqlite3.connect(db, check_same_thread=False)) as conn:
        saver = SqliteSaver(conn)
        for thread, (force, stop_after) in SCENARIOS.items():
            graph = build_graph(model, tokenizer=tokenizer, force=force, max_new_tokens=6)
            expected[thread] = _comparable(graph.invoke(inputs))
            stopped = build_graph(model, saver, tokenizer=tokenizer, force=force, max_new_tokens=6)
            config = {"configurable": {"thread_id": thread}}
            stopped.invoke(inputs, config, interrupt_after=[stop_after])
            assert stopped.get_state(config).next, thread

    forced = json.dumps({thread: force for thread, (force, _) in SCENARIOS.items()})
    done = subprocess.run(
        [sys.executable, "-c", RESUME, str(db), forced], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr
    resumed = json.loads(done.stdout)
    for thread in SCENARIOS:
        assert _comparable(resumed[thread]) == expected[thread], thread
        assert [s["text"] for s in resumed[thread]["steps"] if s["node"] == "mllm"][-1].startswith(PREFIX)
    assert [s[0] for s in expected["region-then-clip"]["steps"]] == [
        "perceive", "mllm", "crop", "mllm", "clip", "mllm", "answer"
    ]
