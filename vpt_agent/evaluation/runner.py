"""`evaluate`: run a VPT_Datasets file through the graph in batches, score, resume, summarize.

DIR/predictions.jsonl gets one line per finished item (id, mode, question, answer, ground truth,
actions, regions, score, error, warnings, timings), appended and fsynced as each batch ends; DIR/summary.json
and DIR/summary.md are written at the end: per mode, and for each pair of modes on the same items.
Re-running with the same DIR resumes: a torn last line (a kill mid-write) is cut off, items with a
line are skipped, and no line is ever rewritten.
Items with unusable data (missing or corrupt image, empty question, no ground truth) get a line
with their error and no score. An item whose run raises (a model or judge failure) gets no line:
it is reported, and the next run retries it.
"""
from __future__ import annotations

import fcntl
import itertools
import json
import os
import statistics
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from ..errors import ConfigError, VPTError
from ..graph import build_graph, resolve_model
from ..prompts import PROMPT_SUFFIXES
from .datasets import Dataset, EvalItem, SyntheticImage, read_dataset
from .distributed import Group, launched, launched_group, local_group
from .judge import OpenAIJudge
from .metrics import METRICS, metric_extras, metric_for, sign_test

PREDICTIONS = "predictions.jsonl"
RUN_RECORD = "run.json"
SUMMARY_JSON = "summary.json"
SUMMARY_MD = "summary.md"
NOTES = 20
"""Unscored items listed in summary.md (summary.json lists all)."""


class EvalError(VPTError):
    """The output folder cannot take this run: another run holds it, it holds another run's
    predictions, or its predictions file is damaged before its last line."""


@dataclass(frozen=True)
class EvalSpec:
    """How every rank builds its graph and scores its lines."""

    model: str | None = None
    """A checkpoint directory; None: the bundled demo model."""
    metric: str | None = None
    """A `METRICS` name; None: `metric_for` the dataset's name."""
    max_new_tokens: int = 64
    max_steps: int = 2
    batch_size: int = 16
    """Items a rank runs at once (the model's batching engine shares their model steps); also the unit
    rank 0 writes, and that a kill loses at most."""
    device: str | None = None
    """None: the rank's GPU if there is one, else the CPU."""
    dtype: str | None = None
    """None: bfloat16 on a GPU, float32 on the CPU."""
    compile: bool = False
    """Decode over a static KV cache with compiled steps (`vpt_agent.model.static_decode`)."""
    judge_url: str | None = None
    judge_model: str = "gpt-4o"
    options: Mapping[str, Any] = field(default_factory=dict)
    """More `VPTOptions` for `build_graph` (e.g. ``force``)."""


@dataclass(frozen=True)
class Task:
    mode: str
    item: EvalItem

    @property
    def key(self) -> tuple[str, str]:
        return self.mode, self.item.id


class PredictionLog:
    """DIR/predictions.jsonl, locked for one run: the finished lines, and appends that survive a kill."""

    def __init__(self, path: Path) -> None:
        self.path = path
        created = not path.exists()
        self._fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o644)
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            raise EvalError(f"another evaluation is writing {path}") from None
        try:
            if created:
                _fsync_dir(path.parent)
            self.lines = self._recover()
            self.done = {(line["mode"], line["id"]) for line in self.lines}
            if len(self.done) != len(self.lines):
                raise EvalError(f"{path} holds an item twice; give another --out")
        except BaseException:
            os.close(self._fd)
            raise

    def _recover(self) -> list[dict[str, Any]]:
        data = self.path.read_bytes()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a line torn by a kill mid-write: its item runs again
            os.ftruncate(self._fd, end)
            os.fsync(self._fd)
        lines = []
        for number, raw in enumerate(data[:end].splitlines(), 1):
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            if not isinstance(line, dict) or "mode" not in line or "id" not in line:
                raise EvalError(f"{self.path}, line {number}, is not a prediction; give another --out")
            lines.append(line)
        return lines

    def append(self, lines: Sequence[dict[str, Any]]) -> None:
        """Write each line with one write() and fsync it."""
        for line in lines:
            data = (json.dumps(line, ensure_ascii=False) + "\n").encode()
            if os.write(self._fd, data) != len(data):
                raise OSError(f"short write to {self.path} (disk full?)")
            os.fsync(self._fd)
            self.lines.append(line)
            self.done.add((line["mode"], line["id"]))

    def close(self) -> None:
        os.close(self._fd)


class Evaluator:
    """One rank's graph, metric and judge."""

    def __init__(self, spec: EvalSpec, local_rank: int) -> None:
        model, tokenizer = resolve_model(spec.model, device=_device(spec.device, local_rank), dtype=spec.dtype)
        self.graph = build_graph(
            model, tokenizer=tokenizer, max_new_tokens=spec.max_new_tokens, max_perception_steps=spec.max_steps,
            compile=spec.compile, **spec.options,
        )
        self.metric = METRICS[spec.metric]
        self.judge = OpenAIJudge(spec.judge_url, spec.judge_model) if spec.judge_url else None

    def run(self, tasks: Sequence[Task]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(lines of the finished tasks, failures) of one batch."""
        inputs = [{"image": _image(task.item), "q": task.item.question} for task in tasks]
        configs = [{"configurable": {"mode": task.mode}, "max_concurrency": len(tasks)} for task in tasks]
        results = self.graph.batch(inputs, configs, return_exceptions=True)
        lines, failures = [], []
        for task, result in zip(tasks, results, strict=True):
            try:
                if isinstance(result, Exception):
                    raise result
                lines.append(self._line(task, result))
            except VPTError as exc:  # ModelError, JudgeError: the next run retries the item
                failures.append({"id": task.item.id, "mode": task.mode, "error": f"{type(exc).__name__}: {exc}"})
        return lines, failures

    def _line(self, task: Task, result: dict[str, Any]) -> dict[str, Any]:
        steps = result.get("steps") or []
        answered = any(step["node"] == "answer" for step in steps)
        answer = result.get("answer") or ""
        line = prediction_line(task, answer=answer, error=result.get("error"), steps=steps)
        line["warnings"] = result.get("warnings") or []
        line["actions"] = [a["kind"] if a["kind"] == "region" else a["reencode"]["branch"] for a in result["actions"]]
        line["regions"] = result.get("regions") or []
        if answered:
            line["score"] = self.metric(answer, task.item.answers)
            if self.judge:
                line["judge"] = self.judge(task.item.question, answer, task.item.answers[0])
        return line


def prediction_line(
    task: Task, *, answer: str = "", error: str | None = None, steps: Sequence[dict[str, Any]] = ()
) -> dict[str, Any]:
    """A line without score: what an item that could not be run gets."""
    item = task.item
    nodes: dict[str, float] = {}
    for step in steps:
        nodes[step["node"]] = round(nodes.get(step["node"], 0.0) + step["duration_ms"], 3)
    return {
        "id": item.id, "index": item.index, "mode": task.mode, "category": item.category,
        "question": item.question, "answer": answer, "ground_truth": list(item.answers),
        "actions": [], "regions": [], "score": None, "error": error, "warnings": [],
        "timings": {"total_ms": round(sum(nodes.values()), 3), "nodes_ms": nodes},
    }


def evaluate(
    dataset: str | Path | Dataset,
    out: str | Path,
    *,
    modes: Sequence[str] | None = None,
    limit: int | None = None,
    workers: int = 1,
    spec: EvalSpec = EvalSpec(),
    progress: bool = True,
) -> dict[str, Any] | None:
    """Evaluate `dataset` (a VPT_Datasets file, or a `Dataset` such as `synthetic_dataset`'s) into
    the folder `out` (resuming what it holds) and return the summary.

    `modes`: prompt modes compared side by side (default: the split's own, from its suffix);
    `limit`: the first items only; `workers`: local ranks. In a process a launcher started as one
    of several ranks, rank 0 does all this and the other ranks only compute (they return None).
    """
    if not launched():
        return _evaluate(dataset, out, modes, limit, workers, spec, progress, None)
    if workers > 1:
        raise ConfigError("--workers starts local ranks; under a launcher (torchrun) give it none")
    with launched_group() as group:
        if group.rank:
            follow(group)
            return None
        return _evaluate(dataset, out, modes, limit, 1, spec, progress, group)


def follow(group: Group) -> None:
    """A rank other than 0: take rank 0's work, run its share of the batches, send the lines."""
    work = group.broadcast(None)
    if work is not None:
        spec, tasks = work
        for _ in _rounds(group, Evaluator(spec, group.local_rank), tasks, spec.batch_size):
            pass


def _evaluate(
    dataset: str | Path | Dataset, out: str | Path, modes: Sequence[str] | None, limit: int | None, workers: int,
    spec: EvalSpec, progress: bool, group: Group | None,
) -> dict[str, Any]:
    data = dataset if isinstance(dataset, Dataset) else read_dataset(dataset)
    spec = replace(spec, metric=spec.metric or metric_for(data.name))
    if spec.metric not in METRICS:
        raise ConfigError(f"unknown metric {spec.metric!r}; expected one of {sorted(METRICS)}")
    modes = list(dict.fromkeys(modes or [data.prompt_mode]))
    if unknown := sorted(set(modes) - set(PROMPT_SUFFIXES)):
        raise ConfigError(f"unknown modes {unknown}; expected some of {list(PROMPT_SUFFIXES)}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    log = PredictionLog(out / PREDICTIONS)
    try:
        _check_run_record(out / RUN_RECORD, _run_record(data, spec))
        tasks = [Task(mode, item) for mode in modes for item in data.items[:limit]]
        todo = [task for task in tasks if task.key not in log.done]
        runnable = [task for task in todo if task.item.problem is None]
        bar = tqdm(total=len(tasks), initial=len(tasks) - len(todo), unit="item", file=sys.stderr,
                   disable=not progress, dynamic_ncols=True)
        with bar:
            unusable = [task for task in todo if task.item.problem is not None]
            log.append([prediction_line(task, error=f"DatasetError: {task.item.problem}") for task in unusable])
            bar.update(len(unusable))
            failures = _run(group, workers, spec, runnable, log, bar)
        keys = {task.key for task in tasks}
        summary = summarize(data, [line for line in log.lines if (line["mode"], line["id"]) in keys],
                            modes, len(data.items[:limit]), spec, failures)
        _write_atomic(out / SUMMARY_JSON, json.dumps(summary, indent=2, ensure_ascii=False) + "\n")
        _write_atomic(out / SUMMARY_MD, render_summary(summary))
        return summary
    finally:
        log.close()


def _run(group: Group | None, workers: int, spec: EvalSpec, tasks: list[Task], log: PredictionLog, bar: tqdm) -> list:
    """Run `tasks` on every rank, writing lines as rounds end; the failures."""
    if group is not None:  # a launcher's ranks wait for the work, or for None
        if tasks:
            return _lead(group, spec, tasks, log, bar)
        group.broadcast(None)
        return []
    if not tasks:
        return []
    batches = -(-len(tasks) // spec.batch_size)
    with local_group(min(workers, batches), follow) as local:
        return _lead(local, spec, tasks, log, bar)


def _lead(group: Group, spec: EvalSpec, tasks: list[Task], log: PredictionLog, bar: tqdm) -> list:
    group.broadcast((spec, tasks))
    evaluator = Evaluator(spec, group.local_rank)
    failures = []
    for outputs in _rounds(group, evaluator, tasks, spec.batch_size):
        for lines, failed in outputs:
            log.append(lines)
            failures += failed
            bar.update(len(lines) + len(failed))
    return failures


def _rounds(group: Group, evaluator: Evaluator, tasks: Sequence[Task], batch_size: int) -> Iterator[list | None]:
    """Batch j runs on rank j % world; after each round of `world` batches rank 0 gets them in order."""
    batches = [tasks[i : i + batch_size] for i in range(0, len(tasks), batch_size)]
    for first in range(0, len(batches), group.world):
        index = first + group.rank
        mine = batches[index] if index < len(batches) else []
        yield group.gather(evaluator.run(mine) if mine else ([], []))


# ------------------------------------------------------------------------------------ summary
def summarize(
    data: Dataset, lines: Sequence[dict[str, Any]], modes: Sequence[str], items: int, spec: EvalSpec,
    failures: Sequence[dict[str, Any]] = (),
) -> dict[str, Any]:
    """Scores and counts per mode, and each pair of modes compared item by item (the summary.json content)."""
    per_mode = {}
    for mode in modes:
        mine = [line for line in lines if line["mode"] == mode]
        scored = [line for line in mine if line["score"] is not None]
        categories = sorted({line["category"] for line in scored if line["category"] is not None})
        per_mode[mode] = {
            "done": len(mine),
            "scored": len(scored),
            "unusable": len(mine) - len(scored),
            "failed": sum(f["mode"] == mode for f in failures),
            "score": _mean(line["score"] for line in scored),
            "judge": _mean(line["judge"] for line in scored if line.get("judge") is not None),
            "perception": _mean(float(bool(line["actions"])) for line in scored),
            "actions_per_item": _mean(len(line["actions"]) for line in scored),
            "refused": sum(not _well_formed(line) for line in scored),
            "well_formed": _mean(float(_well_formed(line)) for line in scored),
            "mean_ms": _mean(line["timings"]["total_ms"] for line in scored),
            "median_ms": statistics.median(t) if (t := [line["timings"]["total_ms"] for line in scored]) else None,
            **metric_extras(spec.metric, [(line["answer"], line["ground_truth"][0]) for line in scored]),
            "categories": {
                c: {"n": sum(line["category"] == c for line in scored),
                    "score": _mean(line["score"] for line in scored if line["category"] == c)}
                for c in categories
            },
        }
    return {
        "dataset": data.name,
        "path": str(data.path),
        "items": items,
        "model": spec.model,
        "metric": spec.metric,
        "modes": per_mode,
        "paired": _paired(lines, modes),
        "unusable": [{"id": line["id"], "mode": line["mode"], "error": line["error"]}
                     for line in lines if line["score"] is None],
        "dataset_problems": list(data.problems),
        "failed": list(failures),
    }


def _paired(lines: Sequence[dict[str, Any]], modes: Sequence[str]) -> dict[str, dict[str, dict[str, Any]]]:
    """For each pair of modes, on the items both scored, overall ("all") and per category: the items
    where the first scored higher (wins), where the second did (losses), and the sign test's p."""
    scored = {mode: {line["id"]: line for line in lines if line["mode"] == mode and line["score"] is not None}
              for mode in modes}
    paired = {}
    for first, second in itertools.combinations(modes, 2):
        both = [(line, scored[second][id_]) for id_, line in scored[first].items() if id_ in scored[second]]
        groups: dict[str, list] = {"all": both}
        for a, b in both:
            if a["category"] is not None:
                groups.setdefault(a["category"], []).append((a, b))
        paired[f"{first} vs {second}"] = {
            group: _duel(pairs) for group, pairs in sorted(groups.items(), key=lambda kv: (kv[0] != "all", kv[0]))
        }
    return paired


def _duel(pairs: Sequence[tuple[dict[str, Any], dict[str, Any]]]) -> dict[str, Any]:
    """Two modes' lines of the same items: how many, where the first scored higher, where the second did, p."""
    wins = sum(a["score"] > b["score"] for a, b in pairs)
    losses = sum(b["score"] > a["score"] for a, b in pairs)
    return {"n": len(pairs), "wins": wins, "losses": losses, "p": sign_test(wins, losses)}


def render_summary(summary: dict[str, Any]) -> str:
    """summary.md: one column per mode, then one per pair of modes (`_render_paired`)."""
    modes = summary["modes"]
    names = list(modes)
    rows = [
        (summary["metric"], "score", _fmt),
        ("LLM judge", "judge", _fmt),
        ("items scored", "scored", lambda v: f"{v} / {summary['items']}"),
        ("unusable items", "unusable", str),
        ("failed (retried next run)", "failed", str),
        ("with perception", "perception", lambda v: "-" if v is None else f"{100 * v:.1f}%"),
        ("actions per item", "actions_per_item", lambda v: _fmt(v, 2)),
        ("refused requests", "refused", str),
        ("well-formed outputs", "well_formed", lambda v: "-" if v is None else f"{100 * v:.1f}%"),
        ("mean time per item", "mean_ms", _ms),
        ("median time per item", "median_ms", _ms),
    ]
    if summary["metric"] == "yesno":
        rows[1:1] = [("precision (yes)", "precision", _fmt), ("recall (yes)", "recall", _fmt),
                     ("F1 (yes)", "f1", _fmt), ("answers yes", "yes_ratio", _fmt)]
    if not any(m["judge"] is not None for m in modes.values()):
        rows = [row for row in rows if row[1] != "judge"]
    text = [
        f"# {summary['dataset']}",
        "",
        f"{summary['items']} items; model `{summary['model'] or 'demo'}`; metric `{summary['metric']}`.",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    text += [f"| {label} | " + " | ".join(fmt(modes[m][key]) for m in names) + " |" for label, key, fmt in rows]
    categories = sorted({c for m in modes.values() for c in m["categories"]})
    text += [
        f"| category: {c} | " + " | ".join(
            f"{_fmt(modes[m]['categories'][c]['score'])} ({modes[m]['categories'][c]['n']})"
            if c in modes[m]["categories"] else "-" for m in names
        ) + " |"
        for c in categories
    ]
    text += _render_paired(summary["paired"])
    notes = [*dict.fromkeys(f"- `{u['id']}`: {u['error']}" for u in summary["unusable"])]
    notes += [f"- {problem}" for problem in summary["dataset_problems"]]
    notes += [f"- `{f['id']}` ({f['mode']}) failed: {f['error']}" for f in summary["failed"]]
    if notes:
        more = [f"- ... {len(notes) - NOTES} more in {SUMMARY_JSON}"] if len(notes) > NOTES else []
        text += ["", "Not scored:", "", *notes[:NOTES], *more]
    return "\n".join(text) + "\n"


def _render_paired(paired: dict[str, dict[str, dict[str, Any]]]) -> list[str]:
    """summary.md's pairs of modes: one column per pair, one row per category (and "all")."""
    if not paired:
        return []
    pairs = list(paired)
    groups = list(dict.fromkeys(group for duel in paired.values() for group in duel))
    text = [
        "",
        "Item by item: the items where the first mode of the pair scored higher / where the second did,",
        "and the exact sign test's two-sided p (the chance of a split at least this uneven between equals).",
        "",
        "| | " + " | ".join(pairs) + " |",
        "|---" * (len(pairs) + 1) + "|",
    ]
    for group in groups:
        cells = [paired[pair].get(group) for pair in pairs]
        label = group if group == "all" else f"category: {group}"
        text.append(f"| {label} | " + " | ".join(
            "-" if c is None else f"+{c['wins']} / -{c['losses']} (p {_p(c['p'])})" for c in cells) + " |")
    return text


def _p(value: float) -> str:
    return "< 0.001" if value < 0.001 else f"{value:.3f}"


# ------------------------------------------------------------------------------------ helpers
def _run_record(data: Dataset, spec: EvalSpec) -> dict[str, Any]:
    """What predictions depend on: a resumed run must match it."""
    record = {
        "dataset": data.name,
        "model": str(Path(spec.model).resolve()) if spec.model else None,
        "metric": spec.metric,
        "max_new_tokens": spec.max_new_tokens,
        "max_steps": spec.max_steps,
        "judge_model": spec.judge_model if spec.judge_url else None,
        "options": dict(spec.options),
    }
    return json.loads(json.dumps(record))


def _check_run_record(path: Path, record: dict[str, Any]) -> None:
    if not path.exists():
        _write_atomic(path, json.dumps(record, indent=2) + "\n")
        return
    previous = json.loads(path.read_text())
    if differ := sorted(key for key in record if previous.get(key) != record[key]):
        raise EvalError(f"{path.parent} holds predictions of another run ({', '.join(differ)} differ); "
                        "give another --out")


def _device(device: str | None, local_rank: int) -> torch.device:
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda":
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device(device)


def _image(item: EvalItem) -> str | torch.Tensor | None:
    return item.image.load() if isinstance(item.image, SyntheticImage) else item.image


def _well_formed(line: dict[str, Any]) -> bool:
    """No refused or malformed request and no other problem in the run, recovered from or not."""
    return line["error"] is None and not line.get("warnings")  # lines of older runs have no warnings


def _ms(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f} ms"


def _mean(values) -> float | None:
    values = list(values)
    return statistics.fmean(values) if values else None


def _fmt(value: float | None, digits: int = 3) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _write_atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text, encoding="utf-8")
    os.replace(partial, path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
