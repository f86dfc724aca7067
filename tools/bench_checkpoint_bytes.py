"""Bytes a checkpointer stores for the example run (``vpt-agent ask --example``: the bundled image and
question, the bundled demo model): per checkpoint and per run, in PostgreSQL and in SQLite, without and
with a LangGraph store in the same database (`build_graph(store=...)`, as the LangGraph server runs the
graph), beside the size of the run's JSON result (``--json``). The image is given as a server client
sends it (a data URL), as the CLI gives it (loaded: a tensor, which the checkpointer stores as PNG) and
as its path.

    python tools/bench_checkpoint_bytes.py                          # starts a throwaway PostgreSQL server
    python tools/bench_checkpoint_bytes.py --dsn postgresql://...   # or uses yours (only this run's thread is counted)

Payload bytes: checkpoints (checkpoint and metadata as JSON text), checkpoint_blobs and checkpoint_writes
(blob) in PostgreSQL; checkpoints (checkpoint, metadata) and writes (value) in SQLite; the store's image
entries (value) in both.
"""
from __future__ import annotations

import argparse
import base64
import json
import sqlite3
import sys
import tempfile
import uuid
from contextlib import ExitStack, closing
from pathlib import Path

from langgraph.checkpoint.postgres import PostgresSaver
from langgraph.checkpoint.sqlite import SqliteSaver
from langgraph.store.postgres import PostgresStore
from langgraph.store.sqlite import SqliteStore

from vpt_agent import build_graph, load_image, result_json
from vpt_agent.example import example
from vpt_agent.images import image_key

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from pg_server import server_bindir, throwaway_postgres  # noqa: E402

POSTGRES_SQL = """
select 'checkpoints' as name, count(*) as rows,
       coalesce(sum(octet_length(checkpoint::text) + octet_length(metadata::text)), 0) as payload,
       coalesce(sum(pg_column_size(checkpoint) + pg_column_size(metadata)), 0) as stored
  from checkpoints where thread_id = %(thread)s
union all
select 'checkpoint_blobs', count(*), coalesce(sum(octet_length(blob)), 0), coalesce(sum(pg_column_size(blob)), 0)
  from checkpoint_blobs where thread_id = %(thread)s
union all
select 'checkpoint_writes', count(*), coalesce(sum(octet_length(blob)), 0), coalesce(sum(pg_column_size(blob)), 0)
  from checkpoint_writes where thread_id = %(thread)s
"""
SQLITE_SQL = """
select 'checkpoints', count(*),
       coalesce(sum(length(cast(checkpoint as blob)) + length(cast(metadata as blob))), 0)
  from checkpoints where thread_id = :thread
union all
select 'writes', count(*), coalesce(sum(length(cast(value as blob))), 0) from writes where thread_id = :thread
"""


STORE_SQL = "select count(*), coalesce(sum(length(value::text)), 0) from store where key = %(key)s"
SQLITE_STORE_SQL = "select count(*), coalesce(sum(length(value)), 0) from store where key = :key"


def images() -> dict[str, object]:
    """The example image in each form measured, by name."""
    path = example().image
    url = "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()
    return {"a data URL": url, "loaded, as the CLI gives it": load_image(path), "as its path": str(path)}


def ask_example(checkpointer, store, image: object, thread: str) -> dict:
    graph = build_graph(checkpointer=checkpointer, store=store)
    return graph.invoke({"image": image, "q": example().question}, {"configurable": {"thread_id": thread}})


def report(backend: str, form: str, store: str, rows: list[tuple]) -> None:
    total, checkpoints = sum(row[2] for row in rows), rows[0][1]
    parts = ", ".join(f"{row[0]} {row[2]} B" for row in rows)
    print(f"{backend:10} image {form:28} {store:8} {checkpoints} checkpoints {total:9d} B per run "
          f"{total / checkpoints:9.0f} B per checkpoint ({parts})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dsn", help="a PostgreSQL connection string (default: start a throwaway server)")
    args = parser.parse_args()
    forms = images()

    with ExitStack() as stack:
        dsn = args.dsn
        if dsn is None:
            bindir = server_bindir()
            if bindir is None:
                sys.exit("no PostgreSQL server binaries (initdb, pg_ctl) found: install PostgreSQL or pass --dsn")
            dsn = stack.enter_context(throwaway_postgres(bindir))
        saver = stack.enter_context(PostgresSaver.from_conn_string(dsn))
        store = stack.enter_context(PostgresStore.from_conn_string(dsn))
        saver.setup()
        store.setup()
        for form, image in forms.items():
            for kept in (None, store):
                thread = f"bench-{uuid.uuid4().hex}"
                result = ask_example(saver, kept, image, thread)
                with saver.conn.cursor() as cur:
                    rows = [tuple(row.values()) for row in cur.execute(POSTGRES_SQL, {"thread": thread})]
                report("PostgreSQL", form, "store" if kept else "no store", rows)
        with store.conn.cursor() as cur:
            count, size = cur.execute(STORE_SQL, {"key": image_key(load_image(example().image))}).fetchone().values()
        print(f"PostgreSQL store: {count} entry of {size} B for the image, whatever the runs and threads")

    with tempfile.TemporaryDirectory() as folder, closing(sqlite3.connect(Path(folder) / "runs.sqlite",
                                                                          check_same_thread=False)) as conn:
        store = SqliteStore(sqlite3.connect(Path(folder) / "runs.sqlite", check_same_thread=False,
                                            isolation_level=None))
        store.setup()
        for form, image in forms.items():
            for kept in (None, store):
                thread = f"bench-{uuid.uuid4().hex}"
                ask_example(SqliteSaver(conn), kept, image, thread)
                report("SQLite", form, "store" if kept else "no store",
                       conn.execute(SQLITE_SQL, {"thread": thread}).fetchall())
        count, size = store.conn.execute(SQLITE_STORE_SQL, {"key": image_key(load_image(example().image))}).fetchone()
        print(f"SQLite store: {count} entry of {size} B for the image")

    size = len(json.dumps(result_json(result), indent=2, ensure_ascii=False).encode())
    print(f"JSON result (vpt-agent ask --example --json): {size} B; answer {result['answer']!r}")


if __name__ == "__main__":
    main()
