"""The bundled demo model (trained by ``tools/train_demo.py`` on the synthetic benchmark) and the
example question shipped with it."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from ..errors import CheckpointError

ASSETS = Path(str(files("vpt_agent") / "assets"))
DEMO_DIR = ASSETS / "demo"
"""config.json, model.safetensors and the tokenizer of the demo model."""
EXAMPLE_IMAGE = ASSETS / "example.png"


@dataclass(frozen=True)
class Example:
    image: Path
    question: str
    answer: str
    """What the demo model answers (the scene's ground truth)."""


def example() -> Example:
    """The example scene and question (``vpt-agent ask --example``)."""
    record = json.loads((ASSETS / "example.json").read_text(encoding="utf-8"))
    return Example(EXAMPLE_IMAGE, record["question"], record["answer"])


def bundled() -> bool:
    """Whether this installation holds the demo model."""
    return (DEMO_DIR / "config.json").is_file()


def default_model(device=None, dtype=None):
    """(model, tokenizer) of the bundled demo model, in eval mode (placed as `load_model` places it)."""
    from ..graph import load_model  # the graph module imports this package

    if not bundled():
        raise CheckpointError(f"the bundled demo model is missing from {DEMO_DIR}; reinstall vpt-agent")
    model, tokenizer = load_model(DEMO_DIR, device=device, dtype=dtype)
    return model.eval(), tokenizer
