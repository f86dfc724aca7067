"""The graph state: only serializable values (str, int, lists, dicts, PNG bytes), so any LangGraph
checkpointer can save and resume a run. Tensors live in `vpt_agent.store.VPTStore`."""
from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any, TypedDict

import torch
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.checkpoint.serde.base import SerializerProtocol
from PIL import Image

from .errors import BadImageError
from .images import load_image, to_png


class StepRecord(TypedDict):
    """One trace record per node run."""

    node: str
    text: str | None
    """mllm: the generated text, special tokens kept; answer: the answer."""
    action: dict[str, Any] | None
    """mllm: the parsed output (`vpt_agent.tokens.ParsedOutput` as JSON)."""
    boxes: list[list[int]]
    """crop: the pixel boxes (x0, y0, x1, y1) on the original image."""
    feature_shape: list[int] | None
    """dino / sam / clip: the shape of the raw encoder features."""
    duration_ms: float
    error: str | None
    """"ErrorType: message" when the node refused or could not do something."""


class InputState(TypedDict):
    image: Any
    """A path, data URL, bytes, PIL image, numpy HWC uint8 array or CHW tensor (`load_image`). When
    the graph has a LangGraph store, `perceive` keeps the image there, once per content, and the state
    holds only `stored_image(key)` from then on."""
    q: str


class OutputState(TypedDict, total=False):
    """What a run returns (no image: results stay small). Lists are written whole by each node, so
    ``stream_mode="updates"`` carries plain JSON values."""

    q: str
    image_size: list[int]
    """[width, height] of the image as the run saw it (upright): the frame of `regions`."""
    answer: str
    actions: list[dict[str, Any]]
    """The perception actions carried out, in order (`ParsedOutput` as JSON)."""
    regions: list[list[int]]
    """Pixel boxes (x0, y0, x1, y1) on the original image of every crop shown to the model."""
    steps: list[StepRecord]
    """One `StepRecord` per node run."""
    error: str | None
    """Why the run has no usable answer (then `answer` is ""): the input was rejected, or the last
    round was empty, malformed or a refused request even after the question was asked again. None
    whenever the run answered."""
    warnings: list[str]
    """What the run recovered from, in order: a refused or malformed request (the question was asked
    again), a question cut to its limit."""


class VPTState(InputState, OutputState, total=False):
    run_id: str
    """Key of this run's tensors in the store (a new one per question)."""
    image_key: str
    """Content hash of the normalized image."""
    prompt: str
    """The question with the prompt mode's suffix, as the model reads it."""
    turns: list[list[int]]
    """Token ids the model generated, one list per round (replayed to rebuild the KV cache)."""
    user_turns: list[dict[str, Any]]
    """The user turn that followed each non-final round: the perception action whose output it
    showed (as in `actions`, plus its ``id``) or ``{"kind": "reask", "id": ...}`` (the question asked
    again after a refused request). A tool node's output waits in the store under the action's id."""
    next_action: dict[str, Any] | None
    """What the next node carries out: an accepted action (with its ``id``), or a re-ask, which goes
    back to mllm; None routes to the answer."""


IMAGES_NAMESPACE = ("vpt_agent", "images")
"""Where `perceive` keeps run images in a LangGraph store: key = content hash, value {"png": base64}."""


def stored_image(key: str) -> dict[str, str]:
    """The state's `image` once the image is in the graph's store under `key`."""
    return {"stored_image": key}


def result_json(result: Mapping[str, Any]) -> dict[str, Any]:
    """The JSON-ready part of a final state: answer, actions, regions, steps, error, warnings."""
    return {key: result.get(key) for key in ("answer", "actions", "regions", "steps", "error", "warnings")}


class ImageSerializer(SerializerProtocol):
    """Checkpoint serializer that stores PIL images and tensors found in graph inputs as PNG bytes.

    LangGraph checkpoints the raw input before any node runs; this lets ``{"image": PIL or tensor}``
    be checkpointed. A value `load_image` rejects is stored as empty bytes, which it rejects again.
    """

    def __init__(self, inner: SerializerProtocol) -> None:
        self.inner = inner

    def dumps_typed(self, obj: Any) -> tuple[str, bytes]:
        return self.inner.dumps_typed(_portable(obj))

    def loads_typed(self, data: tuple[str, bytes]) -> Any:
        return self.inner.loads_typed(data)


def with_image_serde(checkpointer: BaseCheckpointSaver) -> BaseCheckpointSaver:
    """A shallow copy of `checkpointer` (same storage) whose serializer accepts image objects."""
    if isinstance(checkpointer.serde, ImageSerializer):
        return checkpointer
    clone = copy.copy(checkpointer)
    clone.serde = ImageSerializer(checkpointer.serde)
    return clone


def _portable(obj: Any) -> Any:
    if isinstance(obj, (Image.Image, torch.Tensor)):
        try:
            return to_png(load_image(obj, max_pixels=2**62, max_side=2**62))
        except BadImageError:
            return b""
    if type(obj) is dict:
        return {key: _portable(value) for key, value in obj.items()}
    if type(obj) in (list, tuple):
        return type(obj)(_portable(value) for value in obj)
    return obj
