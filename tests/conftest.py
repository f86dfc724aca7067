"""Fixtures shared by several test files."""
from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest
from pg_server import server_bindir, throwaway_postgres

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


@pytest.fixture(scope="session")
def postgres_dsn() -> Iterator[str]:
    """A PostgreSQL connection string: $VPT_TEST_POSTGRES_DSN, else a throwaway server started for the
    session (`pg_server.throwaway_postgres`). Without server binaries the tests fail, naming what to install."""
    if dsn := os.environ.get("VPT_TEST_POSTGRES_DSN"):
        yield dsn
        return
    bindir = server_bindir()
    if bindir is None:
        pytest.fail("no PostgreSQL server binaries (initdb, pg_ctl, postgres) on PATH, in `pg_config --bindir` or "
                    "/usr/lib/postgresql/*/bin: install PostgreSQL (Debian: apt-get install postgresql; .ci/run does) "
                    "or set VPT_TEST_POSTGRES_DSN", pytrace=False)
    with throwaway_postgres(bindir) as dsn:
        yield dsn
