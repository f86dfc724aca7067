"""The graph's nodes: perceive, mllm, the perception tools (crop; dino / sam / clip) and answer.

The state holds only serializable values; every node finds its tensors in the `VPTStore` under
the state's ``run_id`` and rebuilds whatever is missing from the state (the image from the input,
the conversation's KV cache by replaying the recorded turns with forced tokens, tool outputs by
running the tool again). A run therefore resumes from any checkpoint, in any process.

`mllm` hands its round to the model's batching engine (`vpt_agent.model.engine`), so the rounds
of concurrent runs (threads, `batch`, asyncio tasks, several graphs on one model) share model steps.
"""
from __future__ import annotations

import asyncio
import base64
import functools
import inspect
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from langchain_core.runnables import RunnableConfig
from langgraph.config import get_store, get_stream_writer
from langgraph.errors import GraphBubbleUp
from langgraph.graph import END
from langgraph.store.base import BaseStore

from .configuration import VPTOptions
from .errors import (
    BadImageError,
    BadModelOutputError,
    BadQuestionError,
    InputMismatchError,
    ModelError,
    PerceptionLimitError,
    VPTError,
)
from .images import image_key, load_image, to_png, validate_question
from .model.batch import Round
from .model.conversation import Conversation, Turn
from .model.engine import engine_for
from .perception.crop import crops
from .prompts import build_question
from .state import IMAGES_NAMESPACE, StepRecord, VPTState, stored_image
from .store import RunCache, VPTStore
from .streaming import TextDeltas, perception_event
from .tokens import ACTION_STARTS, BRANCHES, ParsedOutput, answer_problem, parse_actions

Node = TypeVar("Node", bound=Callable[..., Any])


def _typed_failures(node: Node) -> Node:
    """A failed node frees its run's tensors (a retry rebuilds them from the state) and re-raises an
    unexpected failure (torch, PIL, ...) as `ModelError`, cause kept."""

    def failed(self: VPTNodes, state: VPTState, exc: Exception) -> ModelError | None:
        """Free the run; the ModelError to raise for `exc`, or None to re-raise it (a VPTError)."""
        self.store.drop(state["run_id"])
        if isinstance(exc, VPTError):
            return None
        return ModelError(f"node {node.__name__!r} failed: {type(exc).__name__}: {exc}")

    if inspect.iscoroutinefunction(node):

        @functools.wraps(node)
        async def arun(self: VPTNodes, state: VPTState, config: RunnableConfig) -> dict[str, Any]:
            try:
                return await node(self, state, config)
            except GraphBubbleUp:
                raise
            except Exception as exc:
                if (error := failed(self, state, exc)) is None:
                    raise
                raise error from exc

        return arun  # type: ignore[return-value]

    @functools.wraps(node)
    def run(self: VPTNodes, state: VPTState, config: RunnableConfig) -> dict[str, Any]:
        try:
            return node(self, state, config)
        except GraphBubbleUp:
            raise
        except Exception as exc:
            if (error := failed(self, state, exc)) is None:
                raise
            raise error from exc

    return run  # type: ignore[return-value]


class VPTNodes:
    """Node functions bound to one model, its tokenizer, default options and a tensor store."""

    def __init__(self, model: Any, tokenizer: Any, options: VPTOptions, store: VPTStore) -> None:
        self.model, self.tokenizer, self.options, self.store = model, tokenizer, options, store
        self.branches: tuple[str, ...] = tuple(model.config.branches)
        self.engine = engine_for(model)
        self.action_starts: tuple[int, ...] = tuple(tokenizer.convert_tokens_to_ids(list(ACTION_STARTS)))
        """Never generated in direct mode: the model answers from the global view."""

    # ------------------------------------------------------------------------------- nodes
    def perceive(self, state: VPTState, config: RunnableConfig) -> dict[str, Any]:
        """Validate and normalize the input, store the image, start a fresh run (its lists start
        empty: a thread may ask one question after another). With a LangGraph store, the image goes
        there once per content and the state keeps only its key."""
        start, opts = time.perf_counter(), self.options.merged(config)
        reset = {name: [] for name in ("turns", "actions", "user_turns", "regions")}
        reset["next_action"] = None
        try:
            with self.engine.preparing():
                image = load_image(state.get("image"), max_pixels=opts.max_pixels, max_side=opts.max_side)
                key = image_key(image)
            question = validate_question(
                state.get("q"), max_chars=opts.max_question_chars, truncate=opts.truncate_question
            )
        except (BadImageError, BadQuestionError) as exc:
            error = _describe(exc)
            return {**reset, "answer": "", "error": error, "warnings": [], "steps": [_record("perceive", start, error=error)]}
        cut = None  # recorded: a warning of the run if it answers
        if dropped := len(state["q"].strip()) - len(question):
            message = f"the question was cut to its first {len(question)} characters ({dropped} dropped)"
            cut = _describe(BadQuestionError(message))
        run_id = uuid.uuid4().hex
        with self.store.using(run_id) as run:
            run.image, run.image_key = image, key
        if (store := get_store()) is not None:
            if store.get(IMAGES_NAMESPACE, key) is None:
                store.put(IMAGES_NAMESPACE, key, {"png": base64.b64encode(to_png(image)).decode()}, index=False)
            reset["image"] = stored_image(key)
        return {
            **reset,
            "run_id": run_id,
            "image_key": key,
            "image_size": [image.shape[2], image.shape[1]],
            "prompt": build_question(question, opts.mode),
            "answer": "",
            "error": None,
            "warnings": [],
            "steps": [_record("perceive", start, error=cut)],
        }

    @_typed_failures
    def mllm(self, state: VPTState, config: RunnableConfig) -> dict[str, Any]:
        """Generate one round on the run's conversation and decide whether a tool runs next."""
        start, opts = time.perf_counter(), self.options.merged(config)
        writer = get_stream_writer()
        with self.store.using(state["run_id"]) as run:
            try:
                with self.engine.preparing():
                    round_ = self._next_round(run, state, opts)
                deltas = TextDeltas(self.tokenizer, len(state["turns"]), writer)
                turn = self.engine.generate(round_, on_tokens=deltas)
            except BaseException:
                run.conversation = None  # possibly half-advanced: the next attempt rebuilds it by replay
                raise
            return self._after_round(run, state, opts, turn, start, deltas)

    @_typed_failures
    async def amllm(self, state: VPTState, config: RunnableConfig) -> dict[str, Any]:
        """`mllm` for asyncio: the round is awaited, not waited for in a thread."""
        start, opts = time.perf_counter(), self.options.merged(config)
        writer = get_stream_writer()
        with self.store.using(state["run_id"]) as run:
            try:
                with self.engine.preparing():
                    round_ = await asyncio.to_thread(self._next_round, run, state, opts)
                deltas = TextDeltas(self.tokenizer, len(state["turns"]), writer)
                turn = await self.engine.agenerate(round_, on_tokens=deltas)
            except BaseException:
                run.conversation = None
                raise
            return self._after_round(run, state, opts, turn, start, deltas)

    @_typed_failures
    def crop(self, state: VPTState, config: RunnableConfig) -> dict[str, Any]:
        """Cut the selected regions out of the full-resolution image (one user turn)."""
        start, opts = time.perf_counter(), self.options.merged(config)
        action = state["next_action"]
        with self.store.using(state["run_id"]) as run, self.engine.preparing():
            run.outputs[action["id"]] = self._tool_output(action, self._image(run, state, opts))
        boxes = [list(region["box"]) for region in action["regions"]]
        record = _record("crop", start, boxes=boxes)
        return {"actions": [*state["actions"], _public(action)], "user_turns": [*state["user_turns"], action],
                "regions": [*state["regions"], *boxes], "next_action": None, "steps": [*state["steps"], record]}

    @_typed_failures
    def reencode(self, state: VPTState, config: RunnableConfig) -> dict[str, Any]:
        """Run the requested branch encoder (dino, sam or clip) on the full-resolution image."""
        start, opts = time.perf_counter(), self.options.merged(config)
        action = state["next_action"]
        with self.store.using(state["run_id"]) as run, self.engine.preparing():
            features = run.outputs[action["id"]] = self._tool_output(action, self._image(run, state, opts))
        record = _record(action["reencode"]["branch"], start, feature_shape=list(features.shape))
        return {"actions": [*state["actions"], _public(action)], "user_turns": [*state["user_turns"], action],
                "next_action": None, "steps": [*state["steps"], record]}

    def answer(self, state: VPTState) -> dict[str, Any]:
        """The last round's text without special tokens, and free the run's tensors. A last round that
        is no usable answer (empty, stray VPT tokens, a refused request) makes the run's `error`, with
        an empty answer; what the run recovered from before it is in `warnings`."""
        start = time.perf_counter()
        *earlier, last = state["steps"]
        error = last["error"]
        text = "" if error else self.tokenizer.decode(state["turns"][-1], skip_special_tokens=True).strip()
        self.store.drop(state["run_id"])
        warnings = [step["error"] for step in earlier if step["error"]]
        record = _record("answer", start, text=text)
        return {"answer": text, "error": error, "warnings": warnings, "steps": [*state["steps"], record]}

    # ----------------------------------------------------------------------------- routing
    @staticmethod
    def after_perceive(state: VPTState) -> str:
        return END if state.get("error") else "mllm"

    @staticmethod
    def route(state: VPTState) -> str:
        """The node for the next action: crop, a branch name, mllm (re-ask), or answer."""
        action = state.get("next_action")
        if action is None:
            return "answer"
        if action["kind"] == "reask":
            return "mllm"
        return "crop" if action["kind"] == "region" else action["reencode"]["branch"]

    # --------------------------------------------------------------------------- internals
    def _next_round(self, run: RunCache, state: VPTState, opts: VPTOptions) -> Round:
        """The round `mllm` generates: on the run's conversation, fed up to it."""
        conversation = self._conversation(run, state, opts)
        index = len(state["turns"])
        forced = self._ids(opts.force[index]) if index < len(opts.force) else []
        suppress = self.action_starts if opts.mode == "direct" else ()
        return Round(conversation, len(forced) + opts.max_new_tokens, forced=forced, suppress=suppress)

    def _conversation(self, run: RunCache, state: VPTState, opts: VPTOptions) -> Conversation:
        """The run's conversation, fed every turn of the state: the live one goes on if it consumed
        exactly the state's rounds and all but its newest user turn; otherwise (a new process, an
        evicted or failed run, a resume from an earlier checkpoint) a new one replays them all."""
        turns, user_turns = state["turns"], state["user_turns"]
        ids = [user_turn["id"] for user_turn in user_turns]
        if run.conversation is None or run.turns != turns or run.user_turns != ids[:-1]:
            run.conversation = Conversation(self.model, self.tokenizer, system_prompt=opts.system_prompt)
            run.conversation.start(self._image(run, state, opts), state["prompt"])
            run.turns, run.user_turns = [], []
        for i, (turn, user_turn) in enumerate(zip(turns, user_turns)):
            if i >= len(run.turns):
                self.engine.generate(Round(run.conversation, len(turn), forced=turn))
                run.turns.append(turn)
            if i >= len(run.user_turns):
                self._feed(run, state, opts, user_turn)
                run.user_turns.append(user_turn["id"])
        return run.conversation

    def _feed(self, run: RunCache, state: VPTState, opts: VPTOptions, user_turn: dict[str, Any]) -> None:
        """Add a user turn to the run's conversation: the question again, or a tool's output
        (computed again if the store lost it)."""
        if user_turn["kind"] == "reask":
            run.conversation.add_text(build_question(state["q"], "direct"))
            return
        output = run.outputs.pop(user_turn["id"], None)
        if output is None:
            output = self._tool_output(user_turn, self._image(run, state, opts))
        if user_turn["kind"] == "region":
            run.conversation.add_regions(output)
        else:
            run.conversation.add_reencode(user_turn["reencode"]["branch"], output)

    def _after_round(
        self, run: RunCache, state: VPTState, opts: VPTOptions, turn: Turn, start: float, deltas: TextDeltas
    ) -> dict[str, Any]:
        """The state update of a round: its tokens, its step record, the next action; its last text
        and its perception request (if any) to the custom stream."""
        run.turns.append(turn.token_ids)
        deltas.finish()
        parsed = parse_actions(turn.text, tuple(state["image_size"]), allowed_branches=set(self.branches))
        action, error = self._accept(parsed, turn, len(state["actions"]), opts)
        request = parsed.model_dump(mode="json")
        if parsed.kind in ("region", "reencode"):
            deltas.write(perception_event(deltas.round, request, error))
        record = _record("mllm", start, text=turn.text, action=request, error=error)
        update = {"turns": [*state["turns"], turn.token_ids], "next_action": action, "steps": [*state["steps"], record]}
        reasked = any(user_turn["kind"] == "reask" for user_turn in state["user_turns"])
        if error is not None and turn.stop != "length" and not reasked:
            # answer without the refused perception: ask the question again, once
            reask = {"kind": "reask", "id": uuid.uuid4().hex}
            update["next_action"], update["user_turns"] = reask, [*state["user_turns"], reask]
        return update

    def _accept(
        self, parsed: ParsedOutput, turn: Turn, steps_done: int, opts: VPTOptions
    ) -> tuple[dict[str, Any] | None, str | None]:
        """(the action to carry out, with a new id, or None; the reason a request is refused, or None)."""
        if parsed.kind == "error":
            return None, _describe(parsed.exception())
        if parsed.kind not in ("region", "reencode"):  # a final answer
            return None, _describe(answer_problem(turn.text, parsed))
        name = "region" if parsed.kind == "region" else parsed.reencode.branch
        if not opts.allows(name):
            allowed = "none in direct mode" if opts.mode == "direct" else ", ".join(opts.allowed_actions)
            refusal = PerceptionLimitError(
                f"the model asked for {name!r} perception, which this run does not allow (allowed: {allowed})"
            )
        elif steps_done >= opts.max_perception_steps:
            refusal = PerceptionLimitError(
                f"the model asked for more perception after {steps_done} steps "
                f"(max_perception_steps={opts.max_perception_steps})"
            )
        elif parsed.kind == "reencode" and (spec := BRANCHES[name]).action_start + spec.action not in turn.text:
            refusal = BadModelOutputError(
                f"{spec.action_start} is not followed by {spec.action}: no state to condition the features on"
            )
        else:
            return {"id": uuid.uuid4().hex, **parsed.model_dump(mode="json")}, None
        return None, _describe(refusal)

    def _tool_output(self, action: dict[str, Any], image: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """Crops of a region action, or raw features of a re-encoding action."""
        if action["kind"] == "region":
            return crops(image, [region["box"] for region in action["regions"]])
        return self.engine.encode(action["reencode"]["branch"], image)

    def _image(self, run: RunCache, state: VPTState, opts: VPTOptions) -> torch.Tensor:
        """The run's normalized image (CPU), decoded again from the state's input if not cached."""
        if run.image is None or run.image_key != state["image_key"]:
            image = load_image(self._stored(state["image"]), max_pixels=opts.max_pixels, max_side=opts.max_side)
            if image_key(image) != state["image_key"]:
                raise InputMismatchError("the image in the state does not match its content hash")
            run.image, run.image_key = image, state["image_key"]
        return run.image

    @staticmethod
    def _stored(image: Any) -> Any:
        """The state's image as `load_image` reads it: PNG bytes from the graph's store if `perceive`
        put it there."""
        if not (isinstance(image, dict) and "stored_image" in image):
            return image
        store: BaseStore | None = get_store()
        item = store.get(IMAGES_NAMESPACE, image["stored_image"]) if store is not None else None
        if item is None:
            raise InputMismatchError(f"the run's image {image['stored_image']} is not in the graph's store")
        return base64.b64decode(item.value["png"])

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def _public(action: dict[str, Any]) -> dict[str, Any]:
    """An action as results show it: the parsed output, without the graph's id."""
    return {key: value for key, value in action.items() if key != "id"}


def _describe(exc: Exception | None) -> str | None:
    return None if exc is None else f"{type(exc).__name__}: {exc}"


def _record(
    node: str,
    start: float,
    *,
    text: str | None = None,
    action: dict[str, Any] | None = None,
    boxes: list[list[int]] | None = None,
    feature_shape: list[int] | None = None,
    error: str | None = None,
) -> StepRecord:
    return StepRecord(
        node=node,
        text=text,
        action=action,
        boxes=boxes or [],
        feature_shape=feature_shape,
        duration_ms=round((time.perf_counter() - start) * 1000, 3),
        error=error,
    )
