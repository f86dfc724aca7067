"""Fixtures shared by several test files."""
from __future__ import annotations

from pathlib import Path

import pytest

import vpt_agent.graph as graph_module
from vpt_agent.model.tiny import tiny_vpt_model
from vpt_agent.store import VPTStore


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory) -> Path:
    """A saved tiny random-weight VPT checkpoint with its tokenizer, as `--model` expects."""
    path = tmp_path_factory.mktemp("ckpt")
    model, tokenizer = tiny_vpt_model()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture
def stores(monkeypatch) -> list[VPTStore]:
    """Every `VPTStore` the graphs built in the test make, in order (to check what runs leave behind)."""
    made: list[VPTStore] = []

    class RecordingStore(VPTStore):
        def __init__(self, *args) -> None:
            super().__init__(*args)
            made.append(self)

    monkeypatch.setattr(graph_module, "VPTStore", RecordingStore)
    return made
