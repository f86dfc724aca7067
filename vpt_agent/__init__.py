"""vpt-agent: Visual Perception Tokens for Qwen2-VL as a LangGraph state machine."""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    BadImageError,
    BadModelOutputError,
    BadQuestionError,
    CheckpointError,
    ConfigError,
    InputMismatchError,
    MissingBranchError,
    ModelError,
    PerceptionLimitError,
    VPTError,
)

# Public names, imported on first use so that `import vpt_agent.tokens` stays light.
_EXPORTS = {
    "build_graph": "vpt_agent.graph",
    "as_tool": "vpt_agent.graph",
    "load_model": "vpt_agent.graph",
    "render_trace": "vpt_agent.trace",
    "load_image": "vpt_agent.images",
    "validate_question": "vpt_agent.images",
    "VPTOptions": "vpt_agent.configuration",
    "VPTState": "vpt_agent.state",
    "result_json": "vpt_agent.state",
    "with_image_serde": "vpt_agent.state",
}
_ERRORS = [
    "BadImageError",
    "BadModelOutputError",
    "BadQuestionError",
    "CheckpointError",
    "ConfigError",
    "InputMismatchError",
    "MissingBranchError",
    "ModelError",
    "PerceptionLimitError",
    "VPTError",
]
__all__ = sorted([*_EXPORTS, *_ERRORS])

if TYPE_CHECKING:
    from .configuration import VPTOptions
    from .graph import as_tool, build_graph, load_model
    from .images import load_image, validate_question
    from .state import VPTState, result_json, with_image_serde
    from .trace import render_trace


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'vpt_agent' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
