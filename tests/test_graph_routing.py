"""Routing, refusals, options and KV-cache replay with a scripted stand-in for the model.

The stand-in plays fixed texts in place of the model's rounds (the batching engine) and logs every
call the graph makes on a conversation; the real model runs the same routes in test_graph_e2e.py.
"""
from __future__ import annotations

import base64
import json
from contextlib import nullcontext
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from langgraph.checkpoint.memory import InMemorySaver
from langgraph.store.memory import InMemoryStore

from vpt_agent.errors import ConfigError, InputMismatchError
from vpt_agent.graph import build_graph
from vpt_agent.images import load_image
from vpt_agent.model.conversation import Turn
from vpt_agent.model.tokenizer import build_char_tokenizer
from vpt_agent.state import IMAGES_NAMESPACE
from vpt_agent.store import VPTStore

TOKENIZER = build_char_tokenizer()
REGION = "<|region_token_start|><|x_1|><|y_2|><|region_token_end|>"
TWO_REGIONS = REGION + "<|region_token_start|><|x_6|><|y_0|><|y_1|><|region_token_end|>"
DINO = "<|detection_action_start|><|detection_action|><|detection_action_end|>"
SAM = "<|seg_action_start|><|seg_action|><|seg_action_end|>"
CLIP = "<|clip_action_start|><|clip_action|><|clip_action_end|>"
END = "<|im_end|>"
STOPS = {
    TOKENIZER.convert_tokens_to_ids(t)
    for t in (END, "<|detection_action_end|>", "<|seg_action_end|>", "<|clip_action_end|>")
}
FEATURES = {"dino": (256, 8), "sam": (8, 64, 64), "clip": (12, 16)}
LOG: list[tuple] = []


class ScriptedConversation:
    """Logs the turns the graph adds; `ScriptedEngine` plays its rounds."""

    script: list[str] = []
    chat = SimpleNamespace(placeholders=())
    cache = None

    def __init__(self, model, tokenizer, *, system_prompt: str = "") -> None:
        self.tokenizer, self.round = tokenizer, 0

    def start(self, image, question) -> None:
        LOG.append(("start", tuple(image.shape), question))

    def add_regions(self, crops) -> None:
        LOG.append(("regions", [tuple(c.shape) for c in crops]))

    def add_reencode(self, branch, features) -> None:
        LOG.append(("reencode", branch, tuple(features.shape)))

    def add_text(self, text) -> None:
        LOG.append(("text", text))


class ScriptedEngine:
    """Generates `script[i]` in round i of a conversation (after any forced ids) and logs each round."""

    max_rows = 8

    def configure(self, **_) -> None:
        pass

    def preparing(self):
        return nullcontext()

    def encode(self, branch, image):
        return torch.zeros(FEATURES[branch])

    def generate(self, round_, on_tokens=None) -> Turn:
        conversation, forced_ids = round_.conversation, list(round_.forced)
        script = ScriptedConversation.script
        text = script[conversation.round] if conversation.round < len(script) else "done" + END
        ids = (forced_ids + TOKENIZER(text, add_special_tokens=False)["input_ids"])[: round_.max_new_tokens]
        stop = next((i for i, t in enumerate(ids) if t in STOPS), None)
        ids = ids if stop is None else ids[: stop + 1]
        conversation.round += 1
        LOG.append(("generate", forced_ids, round_.max_new_tokens))
        if on_tokens is not None:
            on_tokens(ids)
        decoded = TOKENIZER.decode(ids, skip_special_tokens=False)
        return Turn(ids, decoded, "length" if stop is None else ("eos" if decoded.endswith(END) else "action"))

    async def agenerate(self, round_, on_tokens=None) -> Turn:
        return self.generate(round_, on_tokens)


@pytest.fixture
def scripted(monkeypatch, stores):
    """`make(script, branches=..., **options)` -> a graph on the scripted model; the store list."""
    monkeypatch.setattr("vpt_agent.nodes.Conversation", ScriptedConversation)
    monkeypatch.setattr("vpt_agent.nodes.engine_for", lambda model: ScriptedEngine())
    LOG.clear()

    def make(script, branches=("dino", "sam", "clip"), checkpointer=None, store=None, **options):
        ScriptedConversation.script = list(script)
        model = SimpleNamespace(config=SimpleNamespace(branches=branches), parameters=lambda: iter([torch.zeros(1)]))
        return build_graph(model, checkpointer, store=store, tokenizer=TOKENIZER, **options)

    make.stores = stores
    return make


IMAGE = torch.zeros(3, 64, 80, dtype=torch.uint8)  # W=80, H=64: a cell is 10 x 8 px
PROMPT = "What?\nIdentify the region that can help you answer the question, and then answer the question."


def _nodes(result) -> list[str]:
    return [step["node"] for step in result["steps"]]


def test_no_action_answers_directly(scripted):
    result = scripted(["The sign says STOP." + END]).invoke({"image": IMAGE, "q": " What? "})
    assert _nodes(result) == ["perceive", "mllm", "answer"]
    assert result["answer"] == "The sign says STOP."
    assert result["actions"] == [] and result["regions"] == [] and result["error"] is None
    assert LOG[0] == ("start", (3, 64, 80), PROMPT)


def test_one_region_is_cropped_on_the_original_image(scripted):
    result = scripted([REGION + END, "A cat." + END]).invoke({"image": IMAGE, "q": "What?"})
    assert _nodes(result) == ["perceive", "mllm", "crop", "mllm", "answer"]
    assert result["regions"] == [[0, 8, 30, 32]]  # cells x 0..2, y 1..3 with the margin
    assert result["steps"][2]["boxes"] == [[0, 8, 30, 32]]
    assert result["actions"][0]["kind"] == "region"
    assert ("regions", [(3, 24, 30)]) in LOG
    assert result["answer"] == "A cat."


def test_two_regions_become_two_crops_in_one_turn(scripted):
    result = scripted([TWO_REGIONS + END, "Two." + END]).invoke({"image": IMAGE, "q": "What?"})
    assert result["regions"] == [[0, 8, 30, 32], [50, 0, 80, 24]]
    assert [e for e in LOG if e[0] == "regions"] == [("regions", [(3, 24, 30), (3, 24, 30)])]
    assert _nodes(result).count("crop") == 1


@pytest.mark.parametrize("action, branch", [(DINO, "dino"), (SAM, "sam"), (CLIP, "clip")])
def test_reencode_routes_to_its_branch(scripted, action, branch):
    result = scripted([action, "Seen." + END]).invoke({"image": IMAGE, "q": "What?"})
    assert _nodes(result) == ["perceive", "mllm", branch, "mllm", "answer"]
    assert result["steps"][2]["feature_shape"] == list(FEATURES[branch])
    action = {"kind": "reencode", "regions": [], "reencode": {"branch": branch}, "error": None, "error_type": None}
    assert result["actions"] == [action]
    assert ("reencode", branch, FEATURES[branch]) in LOG
    assert result["answer"] == "Seen."


@pytest.mark.parametrize(
    "text, error",
    [
        ("<|region_token_start|><|x_3|><|region_token_end|>ok" + END, "BadModelOutputError: region 0"),
        ("<|region_token_start|><|region_token_end|>ok" + END, "BadModelOutputError: malformed region"),
        ("<|region_token_start|><|x_3|><|y_1|> and no end" + END, "BadModelOutputError: unclosed region"),
        ("<|detection_action_start|>oops" + END, "BadModelOutputError: <|detection_action_start|> is not followed"),
    ],
)
def test_malformed_output_is_recorded_and_answered_without_perception(scripted, text, error):
    result = scripted([text, "Cat." + END]).invoke({"image": IMAGE, "q": "What?"})
    assert _nodes(result) == ["perceive", "mllm", "mllm", "answer"]  # asked again, answered
    assert result["error"] is None and result["warnings"] == [result["steps"][1]["error"]]
    assert result["warnings"][0].startswith(error)
    assert result["actions"] == [] and not [e for e in LOG if e[0] in ("regions", "reencode")]
    assert ("text", "What?") in LOG and result["answer"] == "Cat."


@pytest.mark.parametrize(
    "text, error",
    [
        (END, "BadModelOutputError: the answer is empty"),
        ("  " + END, "BadModelOutputError: the answer is empty"),
        ("<|y_6|><|y_6|><|region_token_end|>" + END, "BadModelOutputError: VPT tokens outside a well-formed action"),
        ("A <|detection_action|> B" + END, "BadModelOutputError: VPT tokens outside a well-formed action"),
    ],
)
def test_an_empty_or_stray_answer_is_asked_again_then_is_the_runs_error(scripted, text, error):
    result = scripted([text, "Cat." + END]).invoke({"image": IMAGE, "q": "What?"})
    assert _nodes(result) == ["perceive", "mllm", "mllm", "answer"] and ("text", "What?") in LOG
    assert result["answer"] == "Cat." and result["error"] is None and result["warnings"][0].startswith(error)
    result = scripted([text, text]).invoke({"image": IMAGE, "q": "What?"})
    assert _nodes(result) == ["perceive", "mllm", "mllm", "answer"]
    assert result["answer"] == "" and result["error"].startswith(error) and result["warnings"][0].startswith(error)


def test_mixed_actions_are_final(scripted):
    result = scripted([REGION + "Cat." + DINO]).invoke({"image": IMAGE, "q": "What?"})
    assert _nodes(result) == ["perceive", "mllm", "answer"]
    assert result["steps"][1]["action"]["kind"] == "finished_mixed"
    assert result["error"] is None and result["answer"] == "Cat."


def test_branch_the_model_lacks(scripted):
    graph = scripted([SAM], branches=("dino",))
    assert "sam" not in graph.get_graph().nodes and "dino" in graph.get_graph().nodes
    result = graph.invoke({"image": IMAGE, "q": "What?"})
    assert result["error"] is None and result["warnings"][0].startswith("MissingBranchError")
    assert _nodes(result) == ["perceive", "mllm", "mllm", "answer"] and result["answer"] == "done"


@pytest.mark.parametrize(
    "options, script",
    [
        ({"allowed_actions": ("dino",)}, [REGION + END]),
        ({"allowed_actions": ("region",)}, [DINO]),
        ({"mode": "direct"}, [REGION + END]),
    ],
)
def test_disallowed_actions_are_refused(scripted, options, script):
    result = scripted(script, **options).invoke({"image": IMAGE, "q": "What?"})
    assert result["warnings"][0].startswith("PerceptionLimitError") and result["actions"] == []
    assert _nodes(result) == ["perceive", "mllm", "mllm", "answer"]


def test_direct_mode_adds_no_suffix(scripted):
    scripted(["Hi" + END], mode="direct").invoke({"image": IMAGE, "q": "What?"})
    assert LOG[0][2] == "What?"


def test_loop_bound(scripted):
    result = scripted([REGION + END] * 5).invoke({"image": IMAGE, "q": "What?"})
    # two crops, a refused third request, the question asked once more (refused again), the answer
    assert _nodes(result) == ["perceive", "mllm", "crop", "mllm", "crop", "mllm", "mllm", "answer"]
    assert len(result["actions"]) == 2 and len(result["regions"]) == 2
    assert "max_perception_steps=2" in result["error"] and result["answer"] == ""  # no answer came

    result = scripted([REGION + END] * 5, max_perception_steps=0).invoke({"image": IMAGE, "q": "What?"})
    assert _nodes(result) == ["perceive", "mllm", "mllm", "answer"] and "max_perception_steps=0" in result["error"]


def test_options_from_configurable_override_arguments(scripted):
    graph = scripted([REGION + END] * 5, max_perception_steps=0)
    config = {"configurable": {"max_perception_steps": 1, "max_new_tokens": 10}}
    result = graph.invoke({"image": IMAGE, "q": "What?"}, config)
    assert len(result["actions"]) == 1
    assert [e[2] for e in LOG if e[0] == "generate"] == [10, 10, 10]


def test_forced_text_comes_first_and_extends_the_budget(scripted):
    graph = scripted(["ignored" + END, "Fine." + END], force=(DINO,), max_new_tokens=4)
    result = graph.invoke({"image": IMAGE, "q": "What?"})
    assert _nodes(result) == ["perceive", "mllm", "dino", "mllm", "answer"]
    first = [e for e in LOG if e[0] == "generate"][0]
    assert first[1] == TOKENIZER(DINO, add_special_tokens=False)["input_ids"] and first[2] == 3 + 4


def test_bad_input_ends_at_perceive(scripted):
    graph = scripted(["x" + END])
    result = graph.invoke({"image": b"not an image", "q": "What?"})
    assert _nodes(result) == ["perceive"] and result["answer"] == ""
    assert result["error"].startswith("BadImageError: not a readable image")
    result = graph.invoke({"image": IMAGE, "q": "  "})
    assert result["error"] == "BadQuestionError: the question is empty"
    assert LOG == []


def test_invalid_options_raise_config_error(scripted):
    with pytest.raises(ConfigError, match="no_such_option"):
        scripted([], no_such_option=1)
    with pytest.raises(ConfigError, match="mode"):
        scripted([], mode="loud")
    with pytest.raises(ConfigError, match="tokenizer"):
        build_graph(SimpleNamespace(config=SimpleNamespace(branches=())))


def test_finished_runs_leave_the_store_empty(scripted):
    graph = scripted([REGION + END, DINO, "ok" + END])
    graph.invoke({"image": IMAGE, "q": "What?"})
    assert len(scripted.stores[-1]) == 0


def test_stream_updates_are_plain_json_and_custom_events_typed(scripted):
    graph = scripted([REGION + END, "A cat." + END])
    events = list(graph.stream({"image": IMAGE, "q": "What?"}, stream_mode=["updates", "custom"]))
    assert json.loads(json.dumps(events)) == [list(event) for event in events]  # plain JSON values only
    updates = [data for mode, data in events if mode == "updates"]
    assert [next(iter(u)) for u in updates] == ["perceive", "mllm", "crop", "mllm", "answer"]
    assert updates[2]["crop"]["regions"] == [[0, 8, 30, 32]] and updates[0]["perceive"]["regions"] == []
    custom = [data for mode, data in events if mode == "custom"]
    assert custom[0] == {
        "type": "perception", "round": 0, "accepted": True, "error": None, "action": updates[2]["crop"]["actions"][0]
    }
    assert [e["type"] for e in custom[1:]] == ["text"] and custom[1] == {"type": "text", "round": 1, "text": "A cat."}
    assert updates[-1]["answer"]["answer"] == "A cat."


def test_a_refused_request_is_streamed_as_not_accepted(scripted):
    graph = scripted([DINO, "Fine." + END], allowed_actions=("region",))
    custom = list(graph.stream({"image": IMAGE, "q": "What?"}, stream_mode="custom"))
    assert custom[0]["type"] == "perception" and custom[0]["accepted"] is False
    assert custom[0]["action"]["reencode"]["branch"] == "dino" and custom[0]["error"].startswith("PerceptionLimitError")
    assert custom[1:] == [{"type": "text", "round": 1, "text": "Fine."}]


def test_a_store_keeps_each_image_once_and_the_state_only_its_key(scripted):
    saver, store = InMemorySaver(), InMemoryStore()
    graph = scripted([REGION + END, "One." + END], checkpointer=saver, store=store)
    for thread in ("a", "b"):
        ScriptedConversation.script = [REGION + END, "One." + END]
        graph.invoke({"image": IMAGE, "q": "What?"}, {"configurable": {"thread_id": thread}}, interrupt_after=["crop"])
    (item,) = store.search(IMAGES_NAMESPACE)
    assert torch.equal(load_image(base64.b64decode(item.value["png"])), IMAGE)
    values = graph.get_state({"configurable": {"thread_id": "a"}}).values
    assert values["image"] == {"stored_image": item.key} == {"stored_image": values["image_key"]}

    resumed = scripted([REGION + END, "One." + END], checkpointer=saver, store=store)  # a new process's graph
    LOG.clear()
    result = resumed.invoke(None, {"configurable": {"thread_id": "a"}})
    assert result["answer"] == "One." and "image" not in result
    assert LOG[0] == ("start", (3, 64, 80), PROMPT)  # the image came back from the store

    store.delete(IMAGES_NAMESPACE, item.key)
    with pytest.raises(InputMismatchError, match="not in the graph's store"):
        scripted([REGION + END, "One." + END], checkpointer=saver, store=store).invoke(
            None, {"configurable": {"thread_id": "b"}}
        )


def test_resume_replays_turns_with_forced_tokens(scripted):
    saver = InMemorySaver()
    config = {"configurable": {"thread_id": "t"}}
    first = scripted([REGION + END, DINO, "Done." + END], checkpointer=saver)
    first.invoke({"image": IMAGE, "q": "What?"}, config, interrupt_after=["crop"])
    assert first.get_state(config).next == ("mllm",)
    LOG.clear()

    second = scripted([REGION + END, DINO, "Done." + END], checkpointer=saver)  # a fresh store: as in a new process
    result = second.invoke(None, config)
    region_ids = TOKENIZER(REGION + END, add_special_tokens=False)["input_ids"]
    assert LOG[:4] == [
        ("start", (3, 64, 80), PROMPT),
        ("generate", region_ids, len(region_ids)),  # round 1 replayed, forced
        ("regions", [(3, 24, 30)]),  # crop recomputed from the state
        ("generate", [], 64),  # round 2 generated anew
    ]
    assert result["answer"] == "Done." and _nodes(result)[-3:] == ["dino", "mllm", "answer"]


def test_resume_from_an_earlier_checkpoint_rebuilds_the_session(scripted):
    saver = InMemorySaver()
    config = {"configurable": {"thread_id": "t"}}
    graph = scripted([REGION + END, "Done." + END], checkpointer=saver)
    graph.invoke({"image": IMAGE, "q": "What?"}, config, interrupt_after=["mllm"])
    graph.invoke(None, config, interrupt_after=["mllm"])  # crop, then round 2: the live session has 2 turns
    after_crop = next(s for s in graph.get_state_history(config) if s.next == ("mllm",))
    LOG.clear()
    ScriptedConversation.script = [REGION + END, "Again." + END]
    result = graph.invoke(None, after_crop.config)
    assert [e[0] for e in LOG] == ["start", "generate", "regions", "generate"]
    assert result["answer"] == "Again."


def test_pil_and_tensor_inputs_are_checkpointed_as_png(scripted):
    saver = InMemorySaver()
    graph = scripted(["ok" + END] * 2, checkpointer=saver)
    assert saver.serde is not graph.checkpointer.serde  # the caller's saver is left as it was
    for i, image in enumerate([Image.new("RGB", (8, 6), "red"), IMAGE.float() / 255]):
        config = {"configurable": {"thread_id": str(i)}}
        assert graph.invoke({"image": image, "q": "What?"}, config)["answer"] == "ok"
        first = list(graph.get_state_history(config))[-1]
        stored = saver.get_tuple(first.config).checkpoint["channel_values"]["__start__"]  # read back from the saver
        assert isinstance(stored["image"], bytes) and torch.equal(load_image(stored["image"]), load_image(image))
        assert isinstance(graph.get_state(config).values["image"], bytes)


def test_a_new_question_on_the_same_thread_starts_afresh(scripted):
    graph = scripted([REGION + END, "One." + END], checkpointer=InMemorySaver())
    config = {"configurable": {"thread_id": "t"}}
    assert len(graph.invoke({"image": IMAGE, "q": "What?"}, config)["regions"]) == 1
    ScriptedConversation.script = ["Two." + END]
    result = graph.invoke({"image": IMAGE, "q": "And now?"}, config)
    assert _nodes(result) == ["perceive", "mllm", "answer"] and result["answer"] == "Two."
    assert result["regions"] == [] and result["actions"] == [] and result["error"] is None


def test_the_store_is_bounded_in_bytes_and_keeps_runs_in_use():
    store = VPTStore(max_bytes=2500)
    for name in "abc":  # 1000 bytes each, one after another: "a" is the oldest
        with store.using(name) as run:
            run.image = torch.zeros(1000, dtype=torch.uint8)
            run.outputs["crop"] = [run.image[:10]]  # a view: counted once
    assert "a" not in store and "b" in store and "c" in store and store.nbytes() == 2000
    with store.using("b") as b, store.using("d") as d:  # both in use: nothing of theirs goes
        d.image = torch.zeros(2000, dtype=torch.uint8)
        with store.using("e") as e:
            e.image = torch.zeros(2000, dtype=torch.uint8)
        assert "b" in store and "d" in store and "e" not in store and "c" not in store
        assert b.image is not None
    assert len(store) == 1 and "b" in store  # "d" was idle while "b" was still in use: it went
    store.drop("b")
    assert len(store) == 0 and store.nbytes() == 0


def test_a_failed_round_is_retried_on_a_rebuilt_session(scripted, monkeypatch):
    saver = InMemorySaver()
    config = {"configurable": {"thread_id": "t"}}
    graph = scripted([REGION + END, "Done." + END], checkpointer=saver)
    real_generate = ScriptedEngine.generate

    def failing(self, round_, on_tokens=None):
        if not round_.forced and round_.conversation.round == 1:  # the fresh second round
            raise RuntimeError("out of memory")
        return real_generate(self, round_, on_tokens)

    monkeypatch.setattr(ScriptedEngine, "generate", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        graph.invoke({"image": IMAGE, "q": "What?"}, config)
    monkeypatch.setattr(ScriptedEngine, "generate", real_generate)
    LOG.clear()
    result = graph.invoke(None, config)  # retried from the last checkpoint (after crop)
    assert [e[0] for e in LOG] == ["start", "generate", "regions", "generate"]
    assert result["answer"] == "Done."
