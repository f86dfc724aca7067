"""`vpt-agent eval` in process: predictions, summaries, modes side by side, bad data, resume, the
folder's guards, failed items, the judge. (Killed runs and several ranks: test_eval_scale.py.)"""
from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path

import pytest

from vpt_agent.cli import main
from vpt_agent.evaluation.datasets import synthetic_dataset
from vpt_agent.evaluation.runner import (
    EvalSpec, PredictionLog, Task, evaluate, prediction_line, render_summary, summarize,
)
from vpt_agent.model.modeling import VPTForConditionalGeneration

FIXTURES = Path(__file__).parent / "fixtures" / "vpt_datasets"
TEXTVQA = str(FIXTURES / "TextVQA_region_test.json")
FIELDS = {"id", "index", "mode", "category", "question", "answer", "ground_truth", "actions", "regions", "score",
          "error", "warnings", "timings"}
REGION = "<|region_token_start|><|x_2|><|y_3|><|region_token_end|>"


def _eval(dataset: str, out: Path, checkpoint: Path, *options: str) -> int:
    return main(["eval", dataset, "--out", str(out), "--model", str(checkpoint), "--max-new-tokens", "4",
                 "--no-progress", *options])


def _lines(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]


def test_predictions_and_summaries_with_modes_side_by_side(checkpoint, tmp_path, capsys):
    assert _eval(TEXTVQA, tmp_path, checkpoint, "--mode", "region,direct") == 0
    lines = _lines(tmp_path)
    assert [(line["mode"], line["index"]) for line in lines] == [("region", i) for i in range(3)] + [
        ("direct", i) for i in range(3)
    ]
    assert all(set(line) == FIELDS for line in lines)
    # random weights: an answer, or a malformed one (the run's error, scored as the empty answer)
    assert all(line["score"] in (0.0, 1.0) for line in lines)
    assert all(line["error"] is None or line["error"].startswith("BadModelOutputError") for line in lines)
    assert lines[0]["ground_truth"] == ["red"] and lines[0]["question"] == "What colour is the sign?"
    assert set(lines[0]["timings"]["nodes_ms"]) >= {"perceive", "mllm", "answer"}
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["metric"] == "vqa" and summary["items"] == 3 and list(summary["modes"]) == ["region", "direct"]
    assert summary["modes"]["direct"]["scored"] == 3 and summary["modes"]["direct"]["perception"] == 0.0
    markdown = (tmp_path / "summary.md").read_text()
    assert capsys.readouterr().out == markdown
    assert "| | region | direct |" in markdown and "| items scored | 3 / 3 | 3 / 3 |" in markdown


def test_scores_regions_and_actions_reach_the_lines(checkpoint, tmp_path):
    spec = EvalSpec(model=str(checkpoint), max_new_tokens=4, options={"force": (REGION, "red<|im_end|>")})
    summary = evaluate(TEXTVQA, tmp_path, spec=spec, progress=False)
    first, second, _ = _lines(tmp_path)
    assert (first["answer"], first["score"], first["actions"]) == ("red", 1.0, ["region"])
    assert first["regions"] == [[8, 10, 32, 25]]  # cells x 1-3, y 2-4 of the 64x40 image
    assert (second["answer"], second["score"]) == ("red", 0.0)
    assert summary["modes"]["region"]["score"] == pytest.approx(1 / 3)
    assert summary["modes"]["region"]["perception"] == 1.0


def test_bad_data_is_reported_per_item(checkpoint, tmp_path):
    assert _eval(str(FIXTURES / "bad_data_test.json"), tmp_path, checkpoint) == 0
    lines = {line["id"]: line for line in _lines(tmp_path)}
    assert lines["good"]["score"] is not None
    assert lines["missing-image"]["error"].startswith("DatasetError: image not found")
    assert lines["corrupt-image"]["error"].startswith("BadImageError: ")  # found by the graph
    assert lines["empty-question"]["error"] == "DatasetError: empty question"
    assert lines["no-answer"]["error"].startswith("DatasetError: no ground truth")
    assert sum(line["score"] is None for line in lines.values()) == 5 == len(lines) - 1
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["modes"]["region"]["unusable"] == 5 and summary["modes"]["region"]["scored"] == 1
    assert summary["dataset_problems"] == ["item 4: duplicate id 'good' (first at item 0), left out"]
    assert "duplicate id 'good'" in (tmp_path / "summary.md").read_text()


def test_a_rerun_skips_finished_items_and_never_rewrites_a_line(checkpoint, tmp_path):
    assert _eval(TEXTVQA, tmp_path, checkpoint, "--limit", "2") == 0
    before = (tmp_path / "predictions.jsonl").read_bytes()
    assert before.count(b"\n") == 2
    assert _eval(TEXTVQA, tmp_path, checkpoint) == 0
    after = (tmp_path / "predictions.jsonl").read_bytes()
    assert after.startswith(before) and after.count(b"\n") == 3
    assert _eval(TEXTVQA, tmp_path, checkpoint) == 0
    assert (tmp_path / "predictions.jsonl").read_bytes() == after


def test_a_torn_last_line_is_cut_and_its_item_runs_again(checkpoint, tmp_path):
    assert _eval(TEXTVQA, tmp_path, checkpoint, "--limit", "2") == 0
    with open(tmp_path / "predictions.jsonl", "ab") as file:
        file.write(b'{"id": "2-f5a0c0af", "index": 2, "mode": "reg')  # a kill in the middle of a write
    assert _eval(TEXTVQA, tmp_path, checkpoint) == 0
    assert [line["index"] for line in _lines(tmp_path)] == [0, 1, 2]


def test_the_output_folder_guards(checkpoint, tmp_path, capsys):
    assert _eval(TEXTVQA, tmp_path, checkpoint, "--limit", "1") == 0
    assert _eval(TEXTVQA, tmp_path, checkpoint, "--max-new-tokens", "5") == 1
    assert "another run (max_new_tokens differ)" in capsys.readouterr().err
    log = PredictionLog(tmp_path / "predictions.jsonl")
    try:
        assert _eval(TEXTVQA, tmp_path, checkpoint) == 1
        assert "another evaluation is writing" in capsys.readouterr().err
    finally:
        log.close()
    with open(tmp_path / "predictions.jsonl", "ab") as file:
        file.write(b"garbage\n")
    assert _eval(TEXTVQA, tmp_path, checkpoint) == 1
    err = capsys.readouterr().err
    assert "line 2, is not a prediction" in err and err.count("\n") == 1


def test_failed_items_get_no_line_and_the_next_run_retries_them(checkpoint, tmp_path, monkeypatch, capsys):
    real = VPTForConditionalGeneration.forward

    def out_of_memory(*args, **kwargs):  # every model step, inside the batching engine
        raise RuntimeError("CUDA out of memory")

    monkeypatch.setattr(VPTForConditionalGeneration, "forward", out_of_memory)
    assert _eval(TEXTVQA, tmp_path, checkpoint) == 1
    err = capsys.readouterr().err
    assert "3 items failed" in err and "ModelError" in err and "CUDA out of memory" in err
    assert _lines(tmp_path) == []
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["modes"]["region"]["failed"] == 3 and len(summary["failed"]) == 3
    monkeypatch.setattr(VPTForConditionalGeneration, "forward", real)
    assert _eval(TEXTVQA, tmp_path, checkpoint) == 0
    assert len(_lines(tmp_path)) == 3


def test_judge_scores_through_an_openai_compatible_endpoint(checkpoint, tmp_path):
    requests = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):
            body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
            requests.append((self.path, self.headers["Authorization"], body))
            body = json.dumps({"choices": [{"message": {"role": "assistant", "content": "score: 0.75"}}]}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = HTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/v1"
        spec = EvalSpec(model=str(checkpoint), max_new_tokens=4, judge_url=url, judge_model="judge-1")
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("OPENAI_API_KEY", "sk-test")
            summary = evaluate(TEXTVQA, tmp_path, spec=spec, progress=False)
    finally:
        server.shutdown()
    assert [line["judge"] for line in _lines(tmp_path)] == [0.75] * 3
    assert summary["modes"]["region"]["judge"] == 0.75
    path, auth, body = requests[0]
    assert path == "/v1/chat/completions" and auth == "Bearer sk-test" and body["model"] == "judge-1"
    prompt = body["messages"][0]["content"]
    assert "What colour is the sign?" in prompt and "Reference answer: red" in prompt
    assert "| LLM judge | 0.750 |" in (tmp_path / "summary.md").read_text()


def test_synthetic_benchmark_in_four_modes(checkpoint, tmp_path, capsys):
    out = tmp_path / "synthetic"
    argv = ["eval", "--synthetic", "--seed", "5", "--per-family", "2", "--out", str(out), "--model", str(checkpoint),
            "--max-new-tokens", "4", "--no-progress"]
    assert main(argv) == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dataset"] == "synthetic-seed5-2-per-family" and summary["metric"] == "exact"
    assert list(summary["modes"]) == ["region", "reencode", "free", "direct"] and summary["items"] == 8
    for mode in summary["modes"].values():
        assert set(mode["categories"]) == {"fine_detail", "spatial", "counting", "existence"}
        assert all(c["n"] == 2 for c in mode["categories"].values())
        assert 0.0 <= mode["well_formed"] <= 1.0 and mode["median_ms"] > 0
    lines = _lines(out)
    assert len(lines) == 32 and len({(line["mode"], line["id"]) for line in lines}) == 32
    assert all(line["actions"] == [] for line in lines if line["mode"] == "direct")  # no perception at all
    markdown = (out / "summary.md").read_text()
    assert "| well-formed outputs |" in markdown and "| category: fine_detail |" in markdown
    score = {(line["mode"], line["id"]): line["score"] for line in lines}
    counting = [line["id"] for line in lines if line["mode"] == "free" and line["category"] == "counting"]
    duel = summary["paired"]["reencode vs free"]["counting"]  # item by item, the same items
    assert duel["n"] == 2 and (duel["wins"], duel["losses"]) == (
        sum(score["reencode", i] > score["free", i] for i in counting),
        sum(score["free", i] > score["reencode", i] for i in counting))
    assert list(summary["paired"]) == ["region vs reencode", "region vs free", "region vs direct", "reencode vs free",
                                       "reencode vs direct", "free vs direct"]
    assert all(d["all"]["n"] == 8 for d in summary["paired"].values())
    assert "| | region vs reencode | region vs free |" in markdown and "| category: counting | +" in markdown
    assert main(argv) == 0  # resumes: nothing left to run, the same summary
    assert json.loads((out / "summary.json").read_text())["modes"] == summary["modes"]


def test_pairs_of_modes_are_compared_item_by_item():
    data = synthetic_dataset(5, 2)  # 8 items: fine_detail, spatial, counting, existence, twice
    scores = {"region": [1, 1, 0, 1, 0, 1, 1, 0], "direct": [0, 1, 1, 0, 0, 1, 0, None]}  # None: unusable
    lines = []
    for mode, row in scores.items():
        for item, score in zip(data.items, row):
            lines.append(prediction_line(Task(mode, item), answer="x") | {"score": score})
    summary = summarize(data, lines, list(scores), len(data.items), EvalSpec(metric="exact"))
    duel = summary["paired"]["region vs direct"]
    assert list(summary["paired"]) == ["region vs direct"] and list(duel)[0] == "all"
    # items 0, 3 and 6 region alone, item 2 direct alone; item 7 is not compared (direct did not score it)
    assert {k: duel["all"][k] for k in ("n", "wins", "losses")} == {"n": 7, "wins": 3, "losses": 1}
    assert duel["all"]["p"] == pytest.approx(2 * 5 / 16)  # P(a 4-item split at least 3 to 1) between equals
    assert {c: (d["n"], d["wins"], d["losses"]) for c, d in duel.items() if c != "all"} == {
        "fine_detail": (2, 1, 0), "spatial": (2, 0, 0), "counting": (2, 1, 1), "existence": (1, 1, 0)}
    markdown = render_summary(summary)
    assert "| | region vs direct |" in markdown and "| all | +3 / -1 (p 0.625) |" in markdown


@pytest.mark.parametrize("argv", [["eval", "--out", "x"], ["eval", TEXTVQA, "--synthetic", "--out", "x"]])
def test_a_dataset_or_synthetic(argv, capsys):
    assert main(argv) == 1
    assert "give a dataset file or --synthetic" in capsys.readouterr().err


def test_eval_in_bfloat16_on_the_static_cache(checkpoint, tmp_path):
    assert _eval(TEXTVQA, tmp_path, checkpoint, "--dtype", "bfloat16", "--device", "cpu", "--compile") == 0
    assert len(_lines(tmp_path)) == 3
