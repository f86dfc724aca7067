"""The graph's nodes: perceive, mllm, the perception tools (crop; dino / sam / clip) and answer.

The state holds only serializable values; every node finds its tensors in the `VPTStore` under
the state's ``run_id`` and rebuilds whatever is missing from the state (the image from its PNG
bytes, the KV cache by replaying the recorded turns with forced tokens, tool outputs by running
the tool again). A run therefore resumes from any checkpoint, in any process.
"""
from __future__ import annotations

import functools
import time
import uuid
from collections.abc import Callable
from typing import Any, TypeVar

import torch
from langchain_core.runnables import RunnableConfig
from langgraph.config import get_stream_writer
from langgraph.errors import GraphBubbleUp
from langgraph.graph import END
from langgraph.types import Overwrite

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
from .model.session import Turn, VPTSession
from .perception.crop import crops
from .perception.reencode import branch_features
from .state import StepRecord, VPTState
from .store import Event, RunCache, VPTStore
from .tokens import ACTION_STARTS, BRANCHES, ParsedOutput, parse_actions
from .prompts import build_question


REASK: dict[str, Any] = {"kind": "reask"}
Node = TypeVar("Node", bound=Callable[..., dict[str, Any]])


def _typed_failures(node: Node) -> Node:
    """Re-raise an unexpected failure of a node (torch, PIL, ...) as `ModelError`, cause kept."""

    @functools.wraps(node)
    def run(self: VPTNodes, state: VPTState, config: RunnableConfig) -> dict[str, Any]:
        try:
            return node(self, state, config)
        except (VPTError, GraphBubbleUp):
            raise
        except Exception as exc:
            raise ModelError(f"node {node.__name__!r} failed: {type(exc).__name__}: {exc}") from exc

    return run  # type: ignore[return-value]


class VPTNodes:
    """Node functions bound to one model, its tokenizer, default options and a tensor store."""

    def __init__(self, model: Any, tokenizer: Any, options: VPTOptions, store: VPTStore) -> None:
        self.model, self.tokenizer, self.options, self.store = model, tokenizer, options, store
        self.branches: tuple[str, ...] = tuple(model.config.branches)
        self.device = next(model.parameters()).device
        self.action_starts: tuple[int, ...] = tuple(tokenizer.convert_tokens_to_ids(list(ACTION_STARTS)))
        """Never generated in direct mode: the model answers from the global view."""

    # ------------------------------------------------------------------------------- nodes
    def perceive(self, state: VPTState, config: RunnableConfig) -> dict[str, Any]:
        """Validate and normalize the input, store the image, start a fresh run."""
        start, opts = time.perf_counter(), self.options.merged(config)
        reset = {name: Overwrite([]) for name in ("turns", "actions", "followups", "regions")}
        reset["pending"] = None
        try:
            image = load_image(state.get("image"), max_pixels=opts.max_pixels, max_side=opts.max_side)
            question = validate_question(
                state.get("q"), max_chars=opts.max_question_chars, truncate=opts.truncate_question
            )
        except (BadImageError, BadQuestionError) as exc:
            error = _describe(exc)
            steps = Overwrite([_record("perceive", start, error=error)])
            return {**reset, "answer": "", "error": error, "steps": steps}
        cut = None  # recorded, and reported as the run's error unless a later one replaces it
        if dropped := len(state["q"].strip()) - len(question):
            message = f"the question was cut to its first {len(question)} characters ({dropped} dropped)"
            cut = _describe(BadQuestionError(message))
        run_id, key = uuid.uuid4().hex, image_key(image)
        run = self.store.run(run_id)
        run.image, run.image_key = image.to(self.device), key
        return {
            **reset,
            "image": to_png(image),
            "run_id": run_id,
            "image_key": key,
            "image_size": [image.shape[2], image.shape[1]],
            "prompt": build_question(question, opts.mode),
            "answer": "",
            "error": None,
            "steps": Overwrite([_record("perceive", start, error=cut)]),
        }

    @_typed_failures
    def mllm(self, state: VPTState, config: RunnableConfig) -> dict[str, Any]:
        """Generate one round on the run's KV cache and decide whether a tool runs next."""
        start, opts = time.perf_counter(), self.options.merged(config)
        round_index = len(state["turns"])
        forced = self._ids(opts.force[round_index]) if round_index < len(opts.force) else []
        writer = get_stream_writer()
        run = self.store.run(state["run_id"])
        try:
            turn = self._session(run, state, opts).generate(
                len(forced) + opts.max_new_tokens, forced={0: forced}, on_text=lambda _row, chunk: writer(chunk)
            )[0]
        except BaseException:
            run.session = None  # possibly half-advanced: the next attempt rebuilds it by replay
            raise
        run.fed.append(("turn", turn.token_ids))
        size = tuple(state["image_size"])
        parsed = parse_actions(turn.text, size, allowed_branches=set(self.branches))
        pending, error = self._accept(parsed, turn, len(state["actions"]), opts)
        record = _record("mllm", start, text=turn.text, action=parsed.model_dump(mode="json"), error=error)
        update = {"turns": [turn.token_ids], "pending": pending, "steps": [record]}
        reasked = any(f["kind"] == "reask" for f in state.get("followups", []))
        if error is not None and turn.stop != "length" and not reasked:
            # answer without the refused perception: ask the question again, once
            update["pending"] = REASK
            update["followups"] = [REASK]
        return update

    @_typed_failures
    def crop(self, state: VPTState, config: RunnableConfig) -> dict[str, Any]:
        """Cut the selected regions out of the full-resolution image tensor (one user turn)."""
        start, opts = time.perf_counter(), self.options.merged(config)
        action = state["pending"]
        run = self.store.run(state["run_id"])
        run.outputs[len(state["actions"])] = self._tool_output(action, self._image(run, state, opts))
        boxes = [list(region["box"]) for region in action["regions"]]
        record = _record("crop", start, boxes=boxes)
        return {"actions": [action], "followups": [action], "regions": boxes, "pending": None, "steps": [record]}

    @_typed_failures
    def reencode(self, state: VPTState, config: RunnableConfig) -> dict[str, Any]:
        """Run the requested branch encoder (dino, sam or clip) on the full-resolution image."""
        start, opts = time.perf_counter(), self.options.merged(config)
        action = state["pending"]
        run = self.store.run(state["run_id"])
        features = self._tool_output(action, self._image(run, state, opts))
        run.outputs[len(state["actions"])] = features
        record = _record(action["reencode"]["branch"], start, feature_shape=list(features.shape))
        return {"actions": [action], "followups": [action], "pending": None, "steps": [record]}

    def answer(self, state: VPTState) -> dict[str, Any]:
        """The last round's text without special tokens; free the run's tensors. The run's error is
        the latest one recorded (a refused request, or a cut question)."""
        start = time.perf_counter()
        text = self.tokenizer.decode(state["turns"][-1], skip_special_tokens=True).strip()
        error = next((s["error"] for s in reversed(state["steps"]) if s["error"]), None)
        self.store.drop(state["run_id"])
        return {"answer": text, "error": error, "steps": [_record("answer", start, text=text)]}

    # ----------------------------------------------------------------------------- routing
    @staticmethod
    def after_perceive(state: VPTState) -> str:
        return END if state.get("error") else "mllm"

    @staticmethod
    def route(state: VPTState) -> str:
        """The node for the pending action: crop, a branch name, mllm (re-ask), or answer."""
        pending = state.get("pending")
        if pending is None:
            return "answer"
        if pending["kind"] == "reask":
            return "mllm"
        return "crop" if pending["kind"] == "region" else pending["reencode"]["branch"]

    # --------------------------------------------------------------------------- internals
    def _accept(
        self, parsed: ParsedOutput, turn: Turn, steps_done: int, opts: VPTOptions
    ) -> tuple[dict[str, Any] | None, str | None]:
        """(the action to carry out, or None; the reason a request is refused, or None)."""
        if parsed.kind == "error":
            return None, _describe(parsed.exception())
        if parsed.kind not in ("region", "reencode"):
            return None, None
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
            return parsed.model_dump(mode="json"), None
        return None, _describe(refusal)

    def _session(self, run: RunCache, state: VPTState, opts: VPTOptions) -> VPTSession:
        """The run's session, brought in line with the state (rebuilt by replay if needed)."""
        events: list[Event] = []
        followups = state.get("followups", [])
        for i, ids in enumerate(state["turns"]):
            events.append(("turn", ids))
            if i < len(followups):
                events.append(("action", followups[i]))
        if run.session is None or run.fed != events[: len(run.fed)]:
            suppress = self.action_starts if opts.mode == "direct" else ()
            run.session = VPTSession(self.model, self.tokenizer, system_prompt=opts.system_prompt, suppress=suppress)
            run.session.start([self._image(run, state, opts)], [state["prompt"]])
            run.fed = []
        for kind, value in events[len(run.fed) :]:
            if kind == "turn":
                run.session.generate(len(value), forced={0: value})
            elif value["kind"] == "reask":
                run.session.add_text(0, build_question(state["q"], "direct"))
            else:
                index = sum(1 for k, v in run.fed if k == "action" and v["kind"] != "reask")
                output = run.outputs.pop(index, None)
                if output is None:
                    output = self._tool_output(value, self._image(run, state, opts))
                if value["kind"] == "region":
                    run.session.add_regions(0, output)
                else:
                    run.session.add_reencode(0, value["reencode"]["branch"], output)
            run.fed.append((kind, value))
        return run.session

    def _tool_output(self, action: dict[str, Any], image: torch.Tensor) -> list[torch.Tensor] | torch.Tensor:
        """Crops of a region action, or raw features of a re-encoding action."""
        if action["kind"] == "region":
            return crops(image, [region["box"] for region in action["regions"]])
        return branch_features(self.model, action["reencode"]["branch"], image)

    def _image(self, run: RunCache, state: VPTState, opts: VPTOptions) -> torch.Tensor:
        """The run's image on the model's device, decoded from the state's PNG if not cached."""
        if run.image is None or run.image_key != state["image_key"]:
            image = load_image(state["image"], max_pixels=opts.max_pixels, max_side=opts.max_side)
            if image_key(image) != state["image_key"]:
                raise InputMismatchError("the image in the state does not match its content hash")
            run.image, run.image_key = image.to(self.device), state["image_key"]
        return run.image

    def _ids(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


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
