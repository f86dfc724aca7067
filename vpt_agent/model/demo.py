"""The bundled demo model, trained by ``tools/train_demo.py`` on the synthetic benchmark (its example
question is in `vpt_agent.example`)."""
from __future__ import annotations

from ..errors import CheckpointError
from ..example import ASSETS

DEMO_DIR = ASSETS / "demo"
"""config.json, model.safetensors and the tokenizer of the demo model."""


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
