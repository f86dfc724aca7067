"""`vpt-agent ask`: output formats, options, and one-line errors (in process; the installed
console script itself runs in test_graph_readme.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

import vpt_agent.graph as graph_module
from vpt_agent.cli import main
from vpt_agent.model import demo


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


def test_json_output_and_trace(checkpoint, image_path, tmp_path, capsys, forced):
    trace = tmp_path / "trace.png"
    argv = ["ask", str(image_path), "What is it?", "--model", str(checkpoint), "--json", "--trace", str(trace)]
    argv += ["--max-new-tokens", "4"]
    forced(FINAL)
    assert main(argv) == 0
    out = capsys.readouterr()
    result = json.loads(out.out)
    assert set(result) == {"answer", "actions", "regions", "steps", "error", "warnings"}
    assert result["answer"] == "It is fine." and result["error"] is None
    assert result["steps"][0]["node"] == "perceive" and result["steps"][-1]["node"] == "answer"
    assert "<|" not in result["answer"]
    assert Image.open(trace).format == "PNG"
    assert out.err == ""  # an explicit model: no demo-model warning


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
    assert out.out == "It is fine.\n" and out.err.startswith("vpt-agent: warning: BadModelOutputError: region 0")
    forced(MALFORMED, MALFORMED)
    assert main(argv) == 1
    out = capsys.readouterr()
    assert out.out == "\n" and out.err.count("\n") == 2  # the recovered request, then the run's error
    assert out.err.splitlines()[1].startswith("vpt-agent: error: BadModelOutputError: region 0")


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
    assert main(["ask", str(image_path), "What is it?"]) == 0
    out = capsys.readouterr()
    assert out.err == "" and len(out.out.splitlines()) >= 1, out  # no random-model warning, an answer line


def test_a_missing_demo_model_is_one_error_line(image_path, monkeypatch, capsys):
    monkeypatch.setattr(demo, "DEMO_DIR", image_path.parent / "no_demo")
    assert main(["ask", str(image_path), "What is it?"]) == 1
    _one_error_line(capsys.readouterr().err, "bundled demo model is missing")


def _one_error_line(err: str, message: str) -> None:
    assert err.count("\n") == 1 and err.startswith("vpt-agent: error:") and message in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["ask", "{tmp}/missing.png", "Q?"], "no such image file"),
        (["ask", "{tmp}", "Q?"], "is a directory"),
        (["ask", "{img}", "   "], "the question is empty"),
        (["ask", "{img}", "Q?", "--model", "{tmp}"], "has no config.json"),
        (["ask", "{img}", "Q?", "--max-steps", "-1", "--model", "{ckpt}"], "max_perception_steps"),
        (["ask", "{img}"], "give an image and a question (or --example)"),
        (["ask", "--example", "{img}"], "--example asks its own question"),
    ],
)
def test_runtime_errors_are_one_line(argv, message, tmp_path, image_path, checkpoint, capsys):
    assert main([a.format(tmp=tmp_path, img=image_path, ckpt=checkpoint) for a in argv]) == 1
    _one_error_line(capsys.readouterr().err, message)


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
    _one_error_line(capsys.readouterr().err, "not a readable image")


def test_a_checkpoint_without_tokenizer(checkpoint, image_path, tmp_path, capsys):
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes((checkpoint / name).read_bytes())
    assert main(["ask", str(image_path), "Q?", "--model", str(bare)]) == 1
    _one_error_line(capsys.readouterr().err, "holds no loadable tokenizer")


def test_a_tokenizer_that_disagrees_with_the_config(checkpoint, image_path, tmp_path, capsys):
    other = tmp_path / "other"
    other.mkdir()
    for file in checkpoint.iterdir():
        (other / file.name).write_bytes(file.read_bytes())
    config = json.loads((other / "config.json").read_text())
    config["image_token_id"], config["video_token_id"] = config["video_token_id"], config["image_token_id"]
    (other / "config.json").write_text(json.dumps(config))
    assert main(["ask", str(image_path), "Q?", "--model", str(other)]) == 1
    _one_error_line(capsys.readouterr().err, "disagrees with the model config on ['image_token_id', 'video_token_id']")
