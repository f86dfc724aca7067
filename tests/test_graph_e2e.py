"""End to end: the real graph on a real tiny random-weight VPT model, for every route.

Random weights rarely ask for perception by themselves, so the `force` option teacher-forces
the first tokens of a round (the route); what follows is the model's own greedy decoding.
"""
from __future__ import annotations

import asyncio
import importlib.util
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from langchain_core.messages import ToolMessage
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.graph.state import CompiledStateGraph
from PIL import Image

from vpt_agent import as_tool, build_graph, render_trace
from vpt_agent.model.tiny import tiny_vpt_model

ROOT = Path(__file__).resolve().parents[1]
REGION = "<|region_token_start|><|x_1|><|y_2|><|region_token_end|><|im_end|>"
TWO_REGIONS = (
    "<|region_token_start|><|x_1|><|y_2|><|region_token_end|>"
    "<|region_token_start|><|x_6|><|y_0|><|y_1|><|region_token_end|><|im_end|>"
)
DINO = "<|detection_action_start|><|detection_action|><|detection_action_end|>"
SAM = "<|seg_action_start|><|seg_action|><|seg_action_end|>"
CLIP = "<|clip_action_start|><|clip_action|><|clip_action_end|>"
MALFORMED = "<|region_token_start|><|x_3|><|region_token_end|><|im_end|>"
PREFIX = "It is"  # forced start of the answer round; the model continues it
FINAL = "It is fine.<|im_end|>"  # a fully forced answer round: pins the route on random weights
Q = "What is it?"


@pytest.fixture(scope="module")
def tiny():
    return tiny_vpt_model()  # dino, sam and clip branches


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(1).integers(0, 256, (3, 56, 84), dtype=np.uint8))


def make(tiny, *force, checkpointer=None, **options) -> CompiledStateGraph:
    model, tokenizer = tiny
    return build_graph(model, checkpointer, tokenizer=tokenizer, force=force, max_new_tokens=6, **options)


def nodes(result) -> list[str]:
    return [step["node"] for step in result["steps"]]


def final_text(result) -> str:
    """What the model generated in the last round, special tokens kept (the answer, if it is one)."""
    return [step["text"] for step in result["steps"] if step["node"] == "mllm"][-1]


ROUTES = {
    "no action": ((FINAL,), ["perceive", "mllm", "answer"]),
    "one region": ((REGION, FINAL), ["perceive", "mllm", "crop", "mllm", "answer"]),
    "two regions": ((TWO_REGIONS, FINAL), ["perceive", "mllm", "crop", "mllm", "answer"]),
    "dino": ((DINO, FINAL), ["perceive", "mllm", "dino", "mllm", "answer"]),
    "sam": ((SAM, FINAL), ["perceive", "mllm", "sam", "mllm", "answer"]),
    "clip": ((CLIP, FINAL), ["perceive", "mllm", "clip", "mllm", "answer"]),
    # a refused or malformed request: the question is asked again and answered without perception
    "malformed": ((MALFORMED, FINAL), ["perceive", "mllm", "mllm", "answer"]),
    "loop bound": ((REGION, DINO, REGION, FINAL), ["perceive", "mllm", "crop", "mllm", "dino", "mllm", "mllm", "answer"]),
}


@pytest.mark.parametrize("route", list(ROUTES))
def test_route(tiny, image, route):
    force, expected = ROUTES[route]
    result = make(tiny, *force).invoke({"image": image, "q": Q})
    assert nodes(result) == expected
    assert isinstance(result["answer"], str) and "<|" not in result["answer"]
    json.dumps({k: result[k] for k in ("answer", "actions", "regions", "steps", "error", "warnings")})
    assert all(step["duration_ms"] >= 0 for step in result["steps"])
    by_node = {step["node"]: step for step in result["steps"]}
    if route == "one region":
        assert result["regions"] == [[0, 7, 31, 28]]  # cells x 0..2, y 1..3 of an 84 x 56 image
        assert by_node["crop"]["boxes"] == result["regions"]
    if route == "two regions":
        assert result["regions"] == [[0, 7, 31, 28], [52, 0, 84, 21]]
        assert len(result["actions"]) == 1 and len(result["actions"][0]["regions"]) == 2
    if route in ("dino", "sam", "clip"):
        shape = {"dino": [256, 32], "sam": [32, 64, 64], "clip": [6, 64]}[route]
        assert by_node[route]["feature_shape"] == shape
        assert result["actions"][0]["reencode"] == {"branch": route}
    if route == "malformed":  # recovered from: a warning, not the run's error
        assert len(result["warnings"]) == 1 and result["warnings"][0].startswith("BadModelOutputError: region 0")
        assert result["steps"][1]["action"]["kind"] == "error" and result["actions"] == []
    elif route == "loop bound":
        assert len(result["warnings"]) == 1 and result["warnings"][0].startswith("PerceptionLimitError")
        assert len(result["actions"]) == 2
    else:
        assert result["warnings"] == []
    assert result["error"] is None and result["answer"] == "It is fine."


def test_unforced_generation_always_finishes(tiny, image):
    for mode in ("region", "reencode", "free", "direct"):
        result = make(tiny, mode=mode).invoke({"image": image, "q": Q})
        assert nodes(result)[-1] == "answer" and isinstance(result["answer"], str)


def test_perception_reaches_the_model(tiny, image):
    """The same forced answer prefix continues differently once a crop or features are in the cache."""
    plain = final_text(make(tiny, PREFIX).invoke({"image": image, "q": Q}))
    for action in (REGION, DINO):
        assert final_text(make(tiny, action, PREFIX).invoke({"image": image, "q": Q})) != plain


def test_every_input_type_gives_the_same_run(tiny, image, tmp_path):
    hwc = image.permute(1, 2, 0).numpy()
    buffer = io.BytesIO()
    Image.fromarray(hwc).save(buffer, format="PNG")
    (tmp_path / "img.png").write_bytes(buffer.getvalue())
    graph = make(tiny, REGION, PREFIX)
    path = tmp_path / "img.png"
    inputs = [str(path), path, buffer.getvalue(), Image.fromarray(hwc), hwc, image, image.float() / 255]
    results = [graph.invoke({"image": obj, "q": Q}) for obj in inputs]
    assert len({final_text(r) for r in results}) == 1
    assert all(r["regions"] == results[0]["regions"] for r in results)


def test_stream_updates_and_typed_events(tiny, image):
    graph = make(tiny, REGION, FINAL)
    updates = list(graph.stream({"image": image, "q": Q}, stream_mode="updates"))
    assert [next(iter(u)) for u in updates] == ["perceive", "mllm", "crop", "mllm", "answer"]
    assert updates[2]["crop"]["regions"] == [[0, 7, 31, 28]]
    assert json.loads(json.dumps(updates)) == updates  # plain JSON values
    events = list(graph.stream({"image": image, "q": Q}, stream_mode=["custom", "values"]))
    custom = [data for mode, data in events if mode == "custom"]
    final = [data for mode, data in events if mode == "values"][-1]
    assert custom[0] == {"type": "perception", "round": 0, "action": final["actions"][0], "accepted": True,
                         "error": None}
    deltas = [e["text"] for e in custom if e["type"] == "text" and e["round"] == 1]
    assert len(deltas) >= 1 and "".join(deltas) == final["answer"] == "It is fine."
    assert not any("<|" in e.get("text", "") for e in custom)  # no special tokens in the text


def test_async_and_batch(tiny, image):
    graph = make(tiny, DINO, PREFIX)
    flipped = image.flip(2)
    expected = [graph.invoke({"image": img, "q": Q})["answer"] for img in (image, flipped)]

    async def run_async():
        one = await graph.ainvoke({"image": image, "q": Q})
        chunks = [c async for c in graph.astream({"image": image, "q": Q}, stream_mode="custom")]
        both = await graph.abatch([{"image": image, "q": Q}, {"image": flipped, "q": Q}])
        return one, chunks, both

    one, chunks, both = asyncio.run(run_async())
    assert one["answer"] == expected[0] and chunks[0]["action"]["reencode"]["branch"] == "dino"
    assert [r["answer"] for r in both] == expected
    assert [r["answer"] for r in graph.batch([{"image": image, "q": Q}, {"image": flipped, "q": Q}])] == expected


@pytest.mark.parametrize("force, stop_after", [((REGION, PREFIX), "crop"), ((DINO, REGION, PREFIX), "mllm")])
def test_resume_in_memory_in_a_fresh_graph(tiny, image, force, stop_after):
    """A new graph has an empty store, as a new process would: the cache is rebuilt by replay."""
    pil = Image.fromarray(image.permute(1, 2, 0).numpy())
    expected = make(tiny, *force).invoke({"image": pil, "q": Q})
    saver = InMemorySaver()
    config = {"configurable": {"thread_id": "resume"}}
    make(tiny, *force, checkpointer=saver).invoke({"image": pil, "q": Q}, config, interrupt_after=[stop_after])
    make(tiny, *force, checkpointer=saver).invoke(None, config, interrupt_after=[stop_after])  # one more stop
    result = make(tiny, *force, checkpointer=saver).invoke(None, config)
    assert result["answer"] == expected["answer"] and final_text(result) == final_text(expected)
    assert final_text(result).startswith(PREFIX)
    assert nodes(result) == nodes(expected) and result["regions"] == expected["regions"]


def _load(path: Path):
    spec = importlib.util.spec_from_file_location(f"graphs_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_subgraph_composition(tiny, image):
    compose = _load(ROOT / "graphs" / "compose.py")
    vpt = make(tiny, REGION, PREFIX)
    parent = compose.build_report_graph(vpt)
    result = parent.invoke({"image": image, "q": Q})
    direct = vpt.invoke({"image": image, "q": Q})
    assert result["answer"] == direct["answer"]
    assert result["report"] == f"Q: {Q}\nA: {direct['answer']} (looked closer at 1 region(s))"
    streamed = [ns for ns, _ in parent.stream({"image": image, "q": Q}, stream_mode="updates", subgraphs=True)]
    assert any(ns and ns[0].startswith("look") for ns in streamed)


def test_langchain_tool(tiny, image, tmp_path):
    path = tmp_path / "img.png"
    Image.fromarray(image.permute(1, 2, 0).numpy()).save(path)
    graph = make(tiny, REGION, FINAL, checkpointer=InMemorySaver())
    tool = as_tool(graph)
    assert tool.name == "look_closely" and set(tool.args) == {"image", "question"}
    expected = make(tiny, REGION, FINAL).invoke({"image": image, "q": Q})["answer"]
    assert tool.invoke({"image": str(path), "question": Q}) == expected
    call = {"type": "tool_call", "id": "1", "name": tool.name, "args": {"image": str(path), "question": Q}}
    message = tool.invoke(call)
    assert isinstance(message, ToolMessage) and message.content == expected
    assert message.artifact["regions"] == [[0, 7, 31, 28]]
    failed = tool.invoke({**call, "id": "2", "args": {"image": str(tmp_path / "no.png"), "question": Q}})
    assert failed.status == "error" and "no such image file" in failed.content
    assert asyncio.run(tool.ainvoke({"image": str(path), "question": Q})) == expected


def test_render_trace(tiny, image, tmp_path):
    result = make(tiny, TWO_REGIONS, DINO, PREFIX).invoke({"image": image, "q": Q})
    out = tmp_path / "trace.png"
    picture = render_trace(image, result, out)
    saved = Image.open(out)
    assert saved.format == "PNG" and saved.size == picture.size and saved.width > 500 and saved.height > 400
    pixels = np.asarray(saved.convert("RGB"))
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100  # the image, crops and text, not a blank
    assert (pixels == [230, 25, 75]).all(axis=2).sum() > 100  # region 1's outline colour
    assert (pixels == [60, 180, 75]).all(axis=2).sum() > 100  # region 2's


def test_langgraph_json_declares_the_graph():
    config = json.loads((ROOT / "langgraph.json").read_text())
    assert config["dependencies"] == ["."]
    for spec in config["graphs"].values():
        file, attr = spec.split(":")
        module = _load(ROOT / file)
        assert isinstance(getattr(module, attr), CompiledStateGraph)
