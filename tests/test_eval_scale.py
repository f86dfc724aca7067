"""`vpt-agent eval` killed mid-run and resumed; several ranks (--workers, torchrun) on the CPU."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from vpt_agent.cli import main
from vpt_agent.evaluation.runner import EvalSpec, evaluate

FIXTURES = Path(__file__).parent / "fixtures" / "vpt_datasets"
BIN = Path(sys.executable).parent
REGION = "<|region_token_start|><|x_2|><|y_3|><|region_token_end|>"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """The fixture's TextVQA and POPE items, repeated to 48 under distinct ids."""
    items = [item for name in ("TextVQA_region_test", "POPE_action_test")
             for item in json.loads((FIXTURES / f"{name}.json").read_text())]
    records = []
    for index in range(48):
        record = dict(items[index % len(items)], id=f"item-{index}")
        record["images"] = [str(FIXTURES / image) for image in record["images"]]
        records.append(record)
    path = tmp_path_factory.mktemp("data") / "mixed_test.json"
    path.write_text(json.dumps(records))
    return str(path)


def _lines(out: Path) -> list[dict]:
    """Predictions without their timings."""
    lines = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    return [{key: value for key, value in line.items() if key != "timings"} for line in lines]


def test_a_killed_run_resumes_with_every_item_exactly_once(checkpoint, dataset, tmp_path):
    out, reference = tmp_path / "killed", tmp_path / "reference"
    args = ["eval", dataset, "--model", str(checkpoint), "--max-new-tokens", "24", "--batch-size", "2", "--no-progress"]
    process = subprocess.Popen([str(BIN / "vpt-agent"), *args, "--out", str(out)],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    predictions = out / "predictions.jsonl"
    deadline = time.monotonic() + 240
    while process.poll() is None and time.monotonic() < deadline:
        if predictions.exists() and predictions.read_bytes().count(b"\n") >= 4:
            process.send_signal(signal.SIGKILL)
            break
        time.sleep(0.005)
    assert process.wait(timeout=60) == -signal.SIGKILL, "the run ended before it could be killed"
    written = predictions.read_bytes()
    assert 4 <= written.count(b"\n") < 48

    assert main([*args, "--out", str(out)]) == 0
    assert predictions.read_bytes().startswith(written)  # no finished line was rewritten
    lines = _lines(out)
    assert sorted(line["id"] for line in lines) == sorted(f"item-{i}" for i in range(48))  # each exactly once
    assert main([*args, "--out", str(reference)]) == 0
    assert lines == _lines(reference)


@pytest.fixture(scope="module")
def one_rank(checkpoint, dataset, tmp_path_factory):
    """Predictions of one rank, a region forced in round 1 so that lines carry actions and regions."""
    out = tmp_path_factory.mktemp("one")
    spec = EvalSpec(model=str(checkpoint), max_new_tokens=6, batch_size=5, options={"force": (REGION,)})
    evaluate(dataset, out, spec=spec, modes=["region"], limit=22, progress=False)
    return out


def test_questions_at_once_give_the_predictions_of_one_at_a_time(checkpoint, dataset, one_rank, tmp_path):
    """--batch-size 16 (questions batched on the model) against 1, every route's rounds mixed."""
    for batch_size in (16, 1):
        spec = EvalSpec(model=str(checkpoint), max_new_tokens=6, batch_size=batch_size)
        evaluate(dataset, tmp_path / str(batch_size), spec=spec, modes=["region", "reencode", "free", "direct"],
                 limit=22, progress=False)
    lines = _lines(tmp_path / "16")
    assert len(lines) == 4 * 22 and lines == _lines(tmp_path / "1")
    spec = EvalSpec(model=str(checkpoint), max_new_tokens=6, batch_size=16, options={"force": (REGION,)})
    evaluate(dataset, tmp_path / "forced", spec=spec, modes=["region"], limit=22, progress=False)
    assert _lines(tmp_path / "forced") == _lines(one_rank)  # batch size 5 there


def test_two_workers_give_the_predictions_of_one(checkpoint, dataset, one_rank, tmp_path):
    spec = EvalSpec(model=str(checkpoint), max_new_tokens=6, batch_size=5, options={"force": (REGION,)})
    summary = evaluate(dataset, tmp_path, spec=spec, modes=["region"], limit=22, workers=2, progress=False)
    assert _lines(tmp_path) == _lines(one_rank)
    assert all(line["actions"] == ["region"] for line in _lines(tmp_path))
    assert summary["modes"]["region"]["scored"] == 22


def test_torchrun_ranks_give_the_predictions_of_one(checkpoint, dataset, tmp_path):
    """The multi-node path (ranks from the launcher's environment), as 2 ranks on this machine."""
    # the forced region is not a CLI option: compare with a one-rank CLI run instead
    args = ["eval", dataset, "--model", str(checkpoint), "--max-new-tokens", "6", "--batch-size", "5", "--limit", "22",
            "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    torchrun = [str(BIN / "torchrun"), "--standalone", "--nproc-per-node", "2", "-m", "vpt_agent.cli"]
    done = subprocess.run([*torchrun, *args, "--out", str(tmp_path / "ranks")],
                          capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("| items scored | 22 / 22 |") == 1  # rank 0 alone reports
    assert main([*args, "--out", str(tmp_path / "one")]) == 0
    assert _lines(tmp_path / "ranks") == _lines(tmp_path / "one")
