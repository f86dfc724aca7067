"""The LangGraph server started as the README starts it (`langgraph dev` in the repository root, the
in-memory runtime), driven over HTTP with the LangGraph SDK: results and thread values without the
image, updates as plain JSON, typed custom events."""
from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from langgraph_sdk import get_sync_client

from vpt_agent import build_graph
from vpt_agent.example import example

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
SERVE = README[README.index("## Serve\n") : README.index("\n## ", README.index("## Serve\n") + 1)]
(COMMAND,) = [line for line in SERVE.splitlines() if line.startswith("langgraph dev")]
README_PORT = re.search(r"--port (\d+)", COMMAND)[1]
"""The README's port; the test serves on a free one instead."""
START_SECONDS = 180
LANGGRAPH = str(Path(sys.executable).parent / "langgraph")  # this environment's CLI


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Iterator[str]:
    """The URL of `langgraph dev` run from the repository root on a free port; stopped afterwards."""
    port = _free_port()
    argv = [LANGGRAPH, *COMMAND.replace(f"--port {README_PORT}", f"--port {port}").split()[1:], "--no-browser",
            "--no-reload"]
    log = tmp_path_factory.mktemp("server") / "server.log"
    with log.open("wb") as out:
        process = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, process, log)
        yield url
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


@pytest.fixture(scope="module")
def inputs() -> dict[str, str]:
    shipped = example()
    image = "data:image/png;base64," + base64.b64encode(shipped.image.read_bytes()).decode()
    return {"image": image, "q": shipped.question}


@pytest.fixture(scope="module")
def expected(inputs) -> dict:
    return build_graph().invoke(inputs)


def test_runs_wait_answers_as_in_process_without_the_image(server, inputs, expected):
    client = get_sync_client(url=server)
    thread = client.threads.create()
    result = client.runs.wait(thread["thread_id"], "vpt", input=inputs)
    assert "image" not in result and len(json.dumps(result)) < 10_000  # the input is 1.2 MB
    for key in ("answer", "actions", "regions", "error", "warnings", "image_size", "q"):
        assert result[key] == expected[key], key
    values = client.threads.get_state(thread["thread_id"])["values"]
    assert values["image"] == {"stored_image": values["image_key"]}  # kept once in the server's store
    assert len(json.dumps(values)) < 10_000


def test_runs_stream_updates_and_typed_custom_events(server, inputs, expected):
    client = get_sync_client(url=server)
    parts = list(client.runs.stream(None, "vpt", input=inputs, stream_mode=["updates", "custom"]))
    updates = [part.data for part in parts if part.event == "updates"]
    custom = [part.data for part in parts if part.event == "custom"]
    assert [next(iter(update)) for update in updates] == [step["node"] for step in expected["steps"]]
    assert "Overwrite" not in json.dumps(updates)
    requests = [event for event in custom if event["type"] == "perception"]
    assert [event["action"] for event in requests] == expected["actions"]
    last = max(event["round"] for event in custom if event["type"] == "text")
    text = "".join(event["text"] for event in custom if event["type"] == "text" and event["round"] == last)
    assert text == expected["answer"]


def test_the_readme_client_snippet(server, tmp_path, monkeypatch):
    (code,) = re.findall(r"```python\n(.*?)```", SERVE, flags=re.S)
    shutil.copy(example().image, tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code.replace(f"http://127.0.0.1:{README_PORT}", server), "README.md", "exec"), {})
    expected = build_graph().invoke({"image": "photo.png", "q": "What is written on the sign?"})
    assert out.getvalue().splitlines() == [f"{expected['answer']} {expected['regions']}", expected["answer"]]


def test_langgraph_up_builds_the_same_configuration(tmp_path):
    """`langgraph up` builds its image from the Dockerfile `langgraph dockerfile` writes (Docker itself
    is not needed for that): the repository installed as a package, the graph found inside it."""
    subprocess.run([LANGGRAPH, "dockerfile", "-c", "langgraph.json", str(tmp_path / "Dockerfile")], cwd=ROOT,
                   check=True, capture_output=True, timeout=120)
    dockerfile = (tmp_path / "Dockerfile").read_text()
    (package,) = re.findall(r"^ADD \. (/deps/[^/\s]+)$", dockerfile, flags=re.M)
    assert f'{{"vpt": "{package}/graphs/vpt.py:graph"}}' in dockerfile


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_ready(url: str, process: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + START_SECONDS
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"langgraph dev exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"{url}/ok", timeout=2).status_code == 200:
                return
        time.sleep(0.5)
    pytest.fail(f"langgraph dev did not answer within {START_SECONDS} s:\n{log.read_text()[-3000:]}")
