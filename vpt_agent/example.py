"""The example shipped with the package (`vpt-agent ask --example`): a synthetic scene and a question
the bundled demo model answers. Light (no torch): the CLI reads it before any model loads."""
from __future__ import annotations

import json
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

ASSETS = Path(str(files("vpt_agent") / "assets"))
"""The package's data: the demo model (``demo/``) and the example."""
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
