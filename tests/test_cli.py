"""`vpt-agent ask`: output formats, options, notices and one-line errors (in process; the installed
console script runs here for the fast errors and in test_graph_readme.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vpt_agent.graph as graph_module
from vpt_agent.cli import DEMO_NOTE, main
from vpt_agent.example import example
from vpt_agent.model import demo

SCRIPT = str(Path(sys.executable).parent / "vpt-agent")  # this environment's console script
DEMO_LOADING = "vpt-agent: loading the bundled demo model (cpu, float32)..."
KEYS = {"image", "question", "answer", "actions", "regions", "steps", "error", "warnings", "note"}


@pytest.fixture
def image_path(tmp_path):
    path = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (60, 90, 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture
def forced(monkeypatch):
    """`forced(*texts)`: the CLI's graphs teacher-force these rounds (random weights answer anything)."""

    real = graph_module.build_graph

    def force(*texts: str) -> None:
        monkeypatch.setattr(graph_module, "build_graph", lambda *a, **kw: real(*a, **kw, force=texts))

    return force


FINAL = "It is fine.<|im_end|>"
MALFORMED = "<|region_token_start|><|x_3|><|region_token_end|><|im_end|>"


def _loading(checkpoint: Path) -> str:
    return f"vpt-agent: loading {checkpoint} (cpu, float32)..."


def test_json_output_and_trace(checkpoint, image_path, tmp_path, capsys, forced):
    trace = tmp_path / "trace.png"
    argv = ["ask", str(image_path), "What is it?", "--model", str(checkpoint), "--json", "--trace", str(trace)]
    argv += ["--max-new-tokens", "4"]
    forced(FINAL)
    assert main(argv) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)  # the whole of stdout
    assert set(result) == KEYS
    assert (result["image"], result["question"]) == (str(image_path), "What is it?")
    assert result["answer"] == "It is fine." and result["error"] is None and result["note"] is None
    assert result["steps"][0]["node"] == "perceive" and result["steps"][-1]["node"] == "answer"
    assert "<|" not in result["answer"]
    assert Image.open(trace).format == "PNG"
    assert out.err == _loading(checkpoint) + "\n"  # an explicit model: no demo-model note


def test_json_is_one_document_with_a_run_error(checkpoint, image_path, capsys, forced):
    forced(MALFORMED, MALFORMED)
    assert main(["ask", str(image_path), "  What is it? ", "--model", str(checkpoint), "--json"]) == 1
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert set(result) == KEYS and result["question"] == "What is it?"  # as asked: stripped
    assert result["error"].startswith("BadModelOutputError: region 0") and result["answer"] == ""
    assert out.err.splitlines() == [_loading(checkpoint), f"vpt-agent: error: {result['error']}"]


def test_example_json_is_one_document_holding_the_image_and_question(capsys):
    assert main(["ask", "--example", "--json"]) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    shipped = example()
    assert set(result) == KEYS and (result["image"], result["question"]) == (str(shipped.image), shipped.question)
    assert result["answer"] == shipped.answer and result["note"] is None  # a synthetic scene: no note
    assert out.err == DEMO_LOADING + "\n"


def test_the_demo_model_notes_an_image_unlike_its_scenes(image_path, capsys):
    """(Direct mode: on noise the demo's perception requests are its own business, not the note's.)"""
    assert main(["ask", str(image_path), "What is it?", "--json", "--mode", "direct"]) == 0
    out = capsys.readouterr()
    assert json.loads(out.out)["note"] == DEMO_NOTE
    assert out.err.splitlines() == [DEMO_LOADING, f"vpt-agent: note: {DEMO_NOTE}"]


@pytest.mark.parametrize("as_json", [False, True])
def test_a_trace_that_cannot_be_written_keeps_the_answer(checkpoint, image_path, tmp_path, monkeypatch, capsys,
                                                         forced, as_json):
    """The trace's folder is there when the arguments are checked and gone when the trace is drawn."""
    folder = tmp_path / "traces"
    folder.mkdir()
    forced(FINAL)
    forcing = graph_module.build_graph
    monkeypatch.setattr(graph_module, "build_graph", lambda *a, **kw: folder.rmdir() or forcing(*a, **kw))
    argv = ["ask", str(image_path), "What is it?", "--model", str(checkpoint), "--trace", str(folder / "t.png")]
    assert main(argv + ["--json"] * as_json) == 1
    out = capsys.readouterr()
    if as_json:
        assert json.loads(out.out)["answer"] == "It is fine."
    else:
        assert out.out == "It is fine.\n"
    assert out.err.splitlines() == [
        _loading(checkpoint), f"vpt-agent: error: --trace: cannot write {folder / 't.png'}: No such file or directory"]


def test_json_is_one_document_when_the_input_is_refused(tmp_path, capsys):
    missing = tmp_path / "missing.png"
    assert main(["ask", str(missing), "What?", "--json"]) == 1
    out = capsys.readouterr()
    document = json.loads(out.out)
    assert document["error"] == f"BadImageError: no such image file: {missing}"
    assert document["image"] == str(missing) and document["question"] == "What?" and document["answer"] == ""
    assert set(document) == {"image", "question", "answer", "actions", "regions", "steps", "error", "warnings", "note"}
    _one_error_line(out.err, f"no such image file: {missing}")


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0
    assert capsys.readouterr().out == f"vpt-agent {version('vpt-agent')}\n"


def test_plain_output_is_the_answer_then_one_line_per_perception_step(checkpoint, image_path, capsys):
    region = "<|region_token_start|><|x_1|><|x_2|><|y_0|><|region_token_end|><|im_end|>"
    argv = ["ask", str(image_path), "What is it?", "--model", str(checkpoint), "--max-new-tokens", "4"]
    main(argv)
    assert len(capsys.readouterr().out.splitlines()) <= 1  # no perception: the answer alone
    graph_options = {"force": (region, "Two.<|im_end|>")}
    real = graph_module.build_graph
    try:
        graph_module.build_graph = lambda *a, **kw: real(*a, **kw, **graph_options)
        assert main(argv) == 0
    finally:
        graph_module.build_graph = real
    assert capsys.readouterr().out.splitlines() == [
        "Two.", "region: cells x 1-2, y 0-0 of 8x8 -> crop (0, 0)-(45, 15) px"]


def test_the_exit_code_follows_the_error(checkpoint, image_path, capsys, forced):
    """A run that recovered answers with a warning (exit 0); a run without a usable answer exits 1."""
    argv = ["ask", str(image_path), "What is it?", "--model", str(checkpoint)]
    forced(MALFORMED, FINAL)
    assert main(argv) == 0
    out = capsys.readouterr()
    loading, warning = out.err.splitlines()
    assert out.out == "It is fine.\n" and loading == _loading(checkpoint)
    assert warning.startswith("vpt-agent: warning: BadModelOutputError: region 0")
    forced(MALFORMED, MALFORMED)
    assert main(argv) == 1
    out = capsys.readouterr()
    assert out.out == "\n" and out.err.count("\n") == 3  # loading, the recovered request, then the run's error
    assert out.err.splitlines()[2].startswith("vpt-agent: error: BadModelOutputError: region 0")


def test_options_reach_the_graph(monkeypatch, checkpoint, image_path, capsys):
    seen = {}
    real = graph_module.build_graph

    def spy(model=None, checkpointer=None, **options):
        seen.update(options, model=model)
        return real(model, checkpointer, **options)

    monkeypatch.setattr(graph_module, "build_graph", spy)
    argv = ["ask", str(image_path), "Q?", "--model", str(checkpoint)]
    argv += ["--max-steps", "0", "--mode", "direct", "--max-new-tokens", "3", "--device", "cpu", "--dtype", "bfloat16"]
    main([*argv, "--compile"])  # random weights: an answer or a malformed one
    assert seen == {"model": str(checkpoint), "max_perception_steps": 0, "mode": "direct", "max_new_tokens": 3,
                    "device": "cpu", "dtype": "bfloat16", "compile": True}


def test_without_a_model_the_demo_model_answers(image_path, capsys):
    assert main(["ask", str(image_path), "What is it?", "--mode", "direct"]) == 0
    out = capsys.readouterr()
    assert len(out.out.splitlines()) >= 1, out  # an answer line
    assert out.err.splitlines() == [DEMO_LOADING, f"vpt-agent: note: {DEMO_NOTE}"]  # a noise image: the note


def test_a_missing_demo_model_is_one_error_line(image_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_DIR", image_path.parent / "no_demo")
    assert main(["ask", str(image_path), "What is it?"]) == 1
    _one_error_line(capsys.readouterr().err, "bundled demo model is missing", loading=DEMO_LOADING)


def _one_error_line(err: str, message: str, loading: str | None = None) -> None:
    """`err` is one error line holding `message`, after the `loading` notice if given."""
    if loading:
        assert err.startswith(loading + "\n"), err
        err = err.removeprefix(loading + "\n")
    assert err.count("\n") == 1 and err.startswith("vpt-agent: error:") and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message, model",
    [
        (["ask", "{tmp}/missing.png", "Q?"], "no such image file: {tmp}/missing.png", None),
        (["ask", "{tmp}", "Q?"], "is a directory", None),
        (["ask", "{img}", "   "], "the question is empty", None),
        (["ask", "{img}", "Q?", "--trace", "{tmp}/no/t.png"], "--trace: cannot write {tmp}/no/t.png: no such directory",
         None),
        (["ask", "{img}", "Q?", "--trace", "{tmp}"], "--trace: cannot write {tmp}: it is a directory", None),
        (["ask", "{img}", "Q?", "--model", "{tmp}"], "has no config.json", "{tmp}"),
        (["ask", "{img}", "Q?", "--max-steps", "-1", "--model", "{ckpt}"], "max_perception_steps", "{ckpt}"),
        (["ask", "{img}"], "give an image and a question (or --example)", None),
        (["ask", "--example", "{img}"], "--example asks its own question", None),
    ],
)
def test_runtime_errors_are_one_line(argv, message, model, tmp_path, image_path, checkpoint, capsys):
    """Input errors before anything loads; model errors after the loading notice."""
    def fill(text: str) -> str:
        return text.format(tmp=tmp_path, img=image_path, ckpt=checkpoint)

    assert main([fill(a) for a in argv]) == 1
    _one_error_line(capsys.readouterr().err, fill(message), model and _loading(Path(fill(model))))


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ask", "{img}", "Q?", "--mode", "loud"], "invalid choice"),
        (["ask", "{img}", "Q?", "--max-steps", "two"], "invalid int value"),
        ([], "required"),
    ],
)
def test_usage_errors_are_one_line(argv, message, image_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([a.format(img=image_path) for a in argv])
    assert exit_info.value.code == 2
    _one_error_line(capsys.readouterr().err, message)


def test_corrupt_image_file(tmp_path, capsys):
    path = tmp_path / "broken.jpg"
    path.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    assert main(["ask", str(path), "Q?"]) == 1
    _one_error_line(capsys.readouterr().err, f"{path}: not a readable image")


def _broken_files(folder: Path) -> dict[str, Path]:
    image = np.random.default_rng(1).integers(0, 256, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(image).save(folder / "ok.png")
    data = (folder / "ok.png").read_bytes()
    (folder / "truncated.png").write_bytes(data[: len(data) // 2])
    (folder / "text.png").write_text("not an image")
    return {name: folder / f"{name}.png" for name in ("ok", "truncated", "text")}


@pytest.mark.parametrize(
    "argv, code, message",
    [
        (["ask", "{tmp}/missing.png", "Q?"], 1, "no such image file: {tmp}/missing.png"),
        (["ask", "{tmp}/text.png", "Q?"], 1, "{tmp}/text.png: not a readable image (unknown format or corrupt header)"),
        (["ask", "{tmp}/truncated.png", "Q?"], 1, "{tmp}/truncated.png: cannot decode the image (image file is truncated"),
        (["ask", "{tmp}/ok.png", " "], 1, "the question is empty"),
        (["ask", "{tmp}/ok.png", "?" * 4001], 1, "the question has 4001 characters; the limit is 4000"),
        (["ask", "--example", "{tmp}/ok.png"], 1, "--example asks its own question"),
        (["ask", "{tmp}/ok.png", "Q?", "--trace", "{tmp}/no/t.png"], 1, "--trace: cannot write {tmp}/no/t.png"),
        (["ask", "{tmp}/ok.png", "Q?", "--loud"], 2, "unrecognized arguments: --loud"),
    ],
)
def test_the_console_script_answers_input_errors_without_importing_torch(argv, code, message, tmp_path):
    """The installed `vpt-agent`, with Python's import profile on stderr: one error line, and neither
    torch, transformers nor langgraph imported (what makes these errors fast)."""
    _broken_files(tmp_path)
    done = subprocess.run([SCRIPT, *(a.format(tmp=tmp_path) for a in argv)], capture_output=True, text=True,
                          timeout=120, env={**os.environ, "PYTHONPROFILEIMPORTTIME": "1"})
    profile = [line for line in done.stderr.splitlines() if line.startswith("import time:")]
    imported = {line.rsplit("|", 1)[1].strip() for line in profile}
    err = "".join(line + "\n" for line in done.stderr.splitlines() if not line.startswith("import time:"))
    assert done.returncode == code and done.stdout == ""
    _one_error_line(err, message.format(tmp=tmp_path))
    assert "vpt_agent.cli" in imported and not imported & {"torch", "transformers", "langgraph"}, sorted(imported)


def test_a_checkpoint_without_tokenizer(checkpoint, image_path, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((checkpoint / name).read_bytes())
    assert main(["ask", str(image_path), "Q?", "--model", str(bare)]) == 1
    _one_error_line(capsys.readouterr().err, "holds no loadable tokenizer", _loading(bare))


def test_a_tokenizer_that_disagrees_with_the_config(checkpoint, image_path, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    for file in checkpoint.iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["image_token_id"], config["video_token_id"] = config["video_token_id"], config["image_token_id"]
    (other / "config.json").write_text(json.dumps(config))
    assert main(["ask", str(image_path), "Q?", "--model", str(other)]) == 1
    _one_error_line(capsys.readouterr().err, "disagrees with the model config on ['image_token_id', 'video_token_id']",
                    _loading(other))
