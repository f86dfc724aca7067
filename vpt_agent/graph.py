"""The VPT LangGraph: perceive -> mllm -> (crop | dino | sam | clip -> mllm)* -> answer.

``mllm`` generates one round; the router reads the action it parsed: a region selection goes to
``crop``, a re-encoding request to its branch node, a final answer to ``answer``. A refused or
malformed request goes back to ``mllm`` once, which asks the question again so that the model
answers without that perception. Tool nodes hand their output back to ``mllm``, which continues
the same KV cache.
"""
from __future__ import annotations

import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from langchain_core.tools import StructuredTool, ToolException
from langgraph._internal._runnable import RunnableCallable  # the sync/async node pair LangGraph's ToolNode uses
from langgraph.checkpoint.base import BaseCheckpointSaver
from langgraph.graph import END, START, StateGraph
from langgraph.graph.state import CompiledStateGraph
from langgraph.store.base import BaseStore
from pydantic import BaseModel, Field

from . import model as vpt_model
from .configuration import VPTOptions
from .errors import BadImageError, BadQuestionError, ConfigError
from .model.demo import default_model
from .model.loading import load_config, load_tokenizer, resolve_checkpoint_dir
from .placement import placement
from .nodes import VPTNodes
from .state import InputState, OutputState, VPTState, result_json, with_image_serde
from .store import DEFAULT_MAX_BYTES, VPTStore


def build_graph(
    model: Any = None,
    checkpointer: BaseCheckpointSaver | bool | None = None,
    *,
    store: BaseStore | None = None,
    tokenizer: Any = None,
    device: str | torch.device | None = None,
    dtype: str | torch.dtype | None = None,
    max_batch_rows: int | None = None,
    max_prefill_tokens: int | None = None,
    compile: bool | None = None,
    max_store_bytes: int = DEFAULT_MAX_BYTES,
    **options: Any,
) -> VPTGraph:
    """The compiled VPT graph: ``graph.invoke({"image": ..., "q": "..."})``.

    `model`: a VPT model on Qwen2-VL or Qwen2.5-VL (pass its `tokenizer`), a checkpoint directory, or
    None for the bundled demo model; `device` and `dtype` place it (a path or the demo model by default
    on the GPU in bfloat16 when there is one, else on the CPU in float32; a model object stays where it
    is unless they are given). `options`: `vpt_agent.configuration.VPTOptions` fields, each
    overridable per run in ``config["configurable"]``. A checkpointer is used through a copy
    whose serializer also accepts PIL images and tensors as input. With a LangGraph `store` (the
    LangGraph server gives one), each image is kept there once per content and checkpoints and
    thread values hold only its key; without one, the state keeps the image as given.

    Concurrent runs of every graph on one model share its batching engine
    (`vpt_agent.model.engine`): `max_batch_rows` (default 64) bounds the rows of one model step and
    `max_prefill_tokens` (default 16384) the new tokens admitted at once; beyond them rounds queue.
    `compile=True` decodes over a static KV cache with steps compiled once per shape bucket (CUDA
    graphs; on the CPU the same static steps run eagerly, no faster).
    Set here, they apply to the model's engine, for every graph on it. `max_store_bytes` bounds the
    tensors this graph keeps for its runs between nodes (`vpt_agent.store`).
    """
    defaults = VPTOptions.build(**options)
    model, tokenizer = resolve_model(model, tokenizer, device=device, dtype=dtype)
    nodes = VPTNodes(model, tokenizer, defaults, VPTStore(max_store_bytes))
    nodes.engine.configure(max_rows=max_batch_rows, max_prefill_tokens=max_prefill_tokens, compile=compile)
    tools = ["crop", *nodes.branches]

    builder = StateGraph(VPTState, input_schema=InputState, output_schema=OutputState)
    builder.add_node("perceive", nodes.perceive)
    builder.add_node("mllm", RunnableCallable(nodes.mllm, nodes.amllm, name="mllm", trace=False))
    builder.add_node("crop", nodes.crop)
    for branch in nodes.branches:
        builder.add_node(branch, nodes.reencode)
    builder.add_node("answer", nodes.answer)

    builder.add_edge(START, "perceive")
    builder.add_conditional_edges("perceive", nodes.after_perceive, ["mllm", END])
    builder.add_conditional_edges("mllm", nodes.route, [*tools, "mllm", "answer"])
    for tool in tools:
        builder.add_edge(tool, "mllm")
    builder.add_edge("answer", END)

    if isinstance(checkpointer, BaseCheckpointSaver):
        checkpointer = with_image_serde(checkpointer)
    compiled = builder.compile(checkpointer=checkpointer, store=store, name="vpt")
    graph = VPTGraph(**{key: value for key, value in compiled.__dict__.items() if key != "__orig_class__"})
    return graph.with_config(max_concurrency=nodes.engine.max_rows)


class VPTGraph(CompiledStateGraph):
    """The compiled VPT graph. `batch` keeps as many runs in flight as the model's engine decodes
    together (`max_batch_rows` when the graph was built) unless the config sets ``max_concurrency``:
    LangChain's default is Python's thread pool width (6 on a 2-core machine), and the engine can only
    batch the runs in flight."""

    def batch(self, inputs, config=None, *, return_exceptions=False, **kwargs):
        return super().batch(inputs, self._in_flight(config, len(inputs)), return_exceptions=return_exceptions,
                             **kwargs)

    def batch_as_completed(self, inputs, config=None, *, return_exceptions=False, **kwargs):
        yield from super().batch_as_completed(inputs, self._in_flight(config, len(inputs)),
                                              return_exceptions=return_exceptions, **kwargs)

    def stream(self, input, config=None, **kwargs):
        yield from super().stream(self._storable(input), config, **kwargs)

    async def astream(self, input, config=None, **kwargs):
        async for chunk in super().astream(self._storable(input), config, **kwargs):
            yield chunk

    def _storable(self, inputs: Any) -> Any:
        """`inputs`, refused if the graph's checkpointer could not save them: LangGraph checkpoints the
        input before `perceive` can record a rejection, and PostgreSQL's JSON holds no NUL character."""
        if isinstance(self.checkpointer, BaseCheckpointSaver) and isinstance(inputs, Mapping):
            for key, error in (("q", BadQuestionError), ("image", BadImageError)):
                if isinstance(inputs.get(key), str) and "\x00" in inputs[key]:
                    name = "question" if key == "q" else "image path"
                    raise error(f"the {name} contains a NUL character (\\x00), which a checkpoint cannot hold")
        return inputs

    def _in_flight(self, config, count: int):
        default = {"max_concurrency": (self.config or {}).get("max_concurrency")}
        if isinstance(config, list) and len(config) == count:
            return [{**default, **(c or {})} for c in config]
        return {**default, **(config or {})}


def resolve_model(model: Any = None, tokenizer: Any = None, *, device: str | torch.device | None = None,
                  dtype: str | torch.dtype | None = None) -> tuple[Any, Any]:
    """(model, tokenizer) from a model object and its tokenizer (moved to `device` / `dtype` if given),
    a checkpoint directory or None (the bundled demo model), loaded on `device` in `dtype` (default:
    the GPU in bfloat16 when there is one, else the CPU in float32)."""
    if model is None:
        return default_model(device=device, dtype=dtype)
    if isinstance(model, (str, Path)):
        return load_model(model, device=device, dtype=dtype)
    if tokenizer is None:
        raise ConfigError("a model object needs its tokenizer: build_graph(model, tokenizer=...)")
    if device is not None or dtype is not None:
        model.to(*placement(device or next(model.parameters()).device, dtype))
    return model, tokenizer


def load_model(path: str | Path, *, device: str | torch.device | None = None,
               dtype: str | torch.dtype | None = None) -> tuple[Any, Any]:
    """A VPT checkpoint directory -> (model on `device` in `dtype`, tokenizer saved beside it), checked
    to agree; by default on the GPU in bfloat16 when there is one, else on the CPU in float32."""
    device, dtype = placement(device, dtype)
    path = resolve_checkpoint_dir(path)
    tokenizer = load_tokenizer(path, load_config(path))  # a bad tokenizer fails before any weight is read
    return vpt_model.VPTForConditionalGeneration.from_pretrained(path, dtype=dtype, device_map=device), tokenizer


class LookInput(BaseModel):
    image: str = Field(description="path of an image file, or a data:image/...;base64,... URL")
    question: str = Field(description="what to find out about the image")


def as_tool(
    graph: CompiledStateGraph,
    *,
    name: str = "look_closely",
    description: str = (
        "Look at an image closely and answer a question about it. The vision model may zoom into "
        "regions or re-encode the image before answering."
    ),
) -> StructuredTool:
    """A LangChain tool running `graph`: content is the answer, artifact the JSON result."""

    def finish(result: dict[str, Any]) -> tuple[str, dict[str, Any]]:
        if result.get("error"):  # no usable answer
            raise ToolException(result["error"])
        return result["answer"], result_json(result)

    def run_config() -> dict[str, Any]:
        return {"configurable": {"thread_id": uuid.uuid4().hex}}

    def look(image: str, question: str) -> tuple[str, dict[str, Any]]:
        return finish(graph.invoke({"image": image, "q": question}, run_config()))

    async def alook(image: str, question: str) -> tuple[str, dict[str, Any]]:
        return finish(await graph.ainvoke({"image": image, "q": question}, run_config()))

    return StructuredTool.from_function(
        func=look,
        coroutine=alook,
        name=name,
        description=description,
        args_schema=LookInput,
        response_format="content_and_artifact",
        handle_tool_error=True,
    )
