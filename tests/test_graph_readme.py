"""The README's CLI and graph examples run as written (in a folder holding photo.png)."""
from __future__ import annotations

import contextlib
import io
import json
import re
import shlex
import shutil
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from released import released_vpt_model

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DATASETS = ROOT / "tests" / "fixtures" / "vpt_datasets"
OURS = README[README.index("## CLI") : README.index("## The model")]  # the graph sections

def section(title: str) -> str:
    start = README.index(f"## {title}\n")
    return README[start : README.index("\n## ", start + 1)]


MODEL_PYTHON = re.findall(r"```python\n(.*?)```", section("The model"), flags=re.S)
RELEASED = re.findall(r"```(python|bash)\n(.*?)```", section("Use the released models"), flags=re.S)
BLOCKS = re.findall(r"```(python|bash)\n(.*?)```", OURS, flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
COMMANDS = [
    line for lang, code in BLOCKS if lang == "bash" for line in code.splitlines() if line.startswith("vpt-agent ")
]


@pytest.fixture
def photo_dir(tmp_path, monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 256, (96, 128, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "photo.png")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _run(code: str) -> tuple[dict, str]:
    """Run a snippet as a script would run (a real module, so TypedDict hints resolve); its globals and stdout."""
    module = types.ModuleType("readme_example")
    sys.modules[module.__name__] = module
    out = io.StringIO()
    try:
        with contextlib.redirect_stdout(out):
            exec(compile(code, "README.md", "exec"), module.__dict__)
    finally:
        del sys.modules[module.__name__]
    return module.__dict__, out.getvalue()


def test_readme_python_examples(photo_dir):
    assert len(PYTHON) == 6
    invoke, at_once, stream, checkpoint, resume, compose = PYTHON

    ns, printed = _run(invoke)
    assert isinstance(ns["result"]["answer"], str) and printed.splitlines()[0] == _first_answer(ns)
    assert (photo_dir / "trace.png").stat().st_size > 1000

    ns, printed = _run(at_once)
    alone = [ns["graph"].invoke({"image": "photo.png", "q": q})["answer"] for q in ns["questions"]]
    assert printed.splitlines() == alone

    _, printed = _run(stream)
    assert printed.startswith("['perceive']\n['mllm']\n")

    ns, printed = _run(checkpoint)
    assert ns["graph"].get_state(ns["config"]).next and printed.startswith("(")

    ns, printed = _run(resume)
    assert printed == ns["result"]["answer"] + "\n"
    assert ns["graph"].get_state({"configurable": {"thread_id": "photo-1"}}).next == ()

    _, printed = _run(compose)
    assert printed.splitlines()[0].startswith("What is written on the sign? -> ")


def _first_answer(ns: dict) -> str:
    return ns["graph"].invoke({"image": "photo.png", "q": "What is written on the sign?"})["answer"]


def test_readme_cli_command(photo_dir):
    assert len(COMMANDS) == 1
    argv = shlex.split(COMMANDS[0])
    script = str(Path(sys.executable).parent / "vpt-agent")
    done = subprocess.run([script, *argv[1:]], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)  # one document, nothing else on stdout
    assert set(result) == {"image", "question", "answer", "actions", "regions", "steps", "error", "warnings", "note"}
    assert result["image"] == "photo.png" and result["note"]  # a noise "photo": the demo model's note
    assert Image.open(photo_dir / "trace.png").format == "PNG"


def test_readme_model_loading_example(tmp_path):
    """The model section's snippet, on a saved tiny checkpoint and the CPU instead of a released one."""
    from vpt_agent.model.tiny import tiny_vpt_model

    model, tokenizer = tiny_vpt_model()
    model.save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    (code,) = MODEL_PYTHON
    ns, _ = _run(code.replace("path/to/Qwen2-VL-2b-VPT-Det", str(tmp_path)))  # as written: no GPU needed
    assert ns["model"].dtype == torch.bfloat16
    assert ns["tokenizer"].convert_tokens_to_ids("<|x_0|>") == tokenizer.convert_tokens_to_ids("<|x_0|>")


def test_readme_released_models_section(photo_dir, tmp_path_factory, monkeypatch, capsys):
    """Every snippet of "Use the released models" as written, on the CPU, with a random checkpoint in
    the released layout standing in for the hub's (the hub is unreachable here)."""
    import huggingface_hub

    from vpt_agent.cli import main

    hub = released_vpt_model(tmp_path_factory.mktemp("hub") / "Qwen2-VL-2b-VPT-Det")
    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo_id, **_: asked.append(repo_id) or str(hub))
    shutil.copytree(DATASETS, photo_dir, dirs_exist_ok=True)
    python = [code for lang, code in RELEASED if lang == "python"]
    commands = [line for lang, code in RELEASED if lang == "bash" for line in code.splitlines()]
    assert len(python) == 2 and len(commands) == 2

    ns, printed = _run(python[0] + python[1])  # one session, as a reader goes on
    assert ns["result"]["answer"] and not ns["result"]["error"]
    assert printed.endswith("\n" + ns["result"]["answer"] + "\n")  # the static cache answers the same

    for command in commands:
        assert main(shlex.split(command)[1:] + (["--no-progress"] if " eval " in command else [])) == 0
    assert (photo_dir / "runs" / "textvqa" / "summary.json").is_file()
    assert asked == ["rp-yu/Qwen2-VL-2b-VPT-Det"] * 3
