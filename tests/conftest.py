"""Fixtures shared by several test files."""
from __future__ import annotations

from pathlib import Path

import pytest

from vpt_agent.model.tiny import tiny_vpt_model


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A saved tiny random-weight VPT checkpoint with its tokenizer, as `--model` expects."""
    path = tmp_path_factory.mktemp("ckpt")
    model, tokenizer = tiny_vpt_model()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
