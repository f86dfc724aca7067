"""Throughput of the VPT graph: N questions at once against one at a time, side by side in one run.

    python tools/bench_throughput.py                              # bundled demo model, CPU, 16 fine-detail questions
    python tools/bench_throughput.py --questions 64 --routes mixed
    python tools/bench_throughput.py --arch 2b --device cuda --dtype bfloat16   # Qwen2-VL-2B shapes, random weights

Modes: one at a time (`invoke` in a loop), `graph.batch`, N threads each calling `invoke`, and N
asyncio tasks awaiting `ainvoke`; all share the model's batching engine. Every repeat runs each
mode once, in turn, so drift of the machine hits all of them alike; the table gives medians over
the repeats: seconds for all N questions, questions per second and its ratio to one at a time,
the p50 / p95 latency of a question (its start to its answer), and peak memory (resident memory
of the process, or GPU memory allocated). The answers of every mode must equal those of one at a
time, or the run fails.

`--modes ...,session` adds the upper bound of batching the questions: all of them as the rows of one
synchronous `VPTSession`, without the graph (region route only).

`--breakdown` adds where each mode's time goes, per question: the ViT, the LLM, the images' Qwen2-VL
preprocessing (the engine's, and a clip re-encoding's in its tool), and the rest (the graph, the
other tools, waiting).
The model's parts do not shrink by batching as the rest does: their batched sum, against one at a
time's whole time, bounds the ratio any scheduling of the graph can reach.

Routes: `region` asks fine-detail questions in region mode (the paper's effect); `mixed` cycles
through region (fine detail), re-encoding (counting), free (existence) and direct (spatial) on
the demo model. On `--arch 2b` (random weights, which ask for nothing by themselves) the routes
are teacher-forced through the `force` option: a region, a clip re-encoding, or none, each
followed by `--answer-tokens` generated tokens.
"""
from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_session import build  # noqa: E402  (the same random Qwen2-VL-2B-shaped model)

from vpt_agent import build_graph, load_image  # noqa: E402
from vpt_agent.data.synthetic import FAMILIES, make_item  # noqa: E402
from vpt_agent.model.demo import default_model  # noqa: E402
from vpt_agent.model.session import VPTSession  # noqa: E402
from vpt_agent.perception.crop import crops  # noqa: E402
from vpt_agent.prompts import build_question  # noqa: E402
from vpt_agent.tokens import parse_actions  # noqa: E402

SEED = 1000
"""The held-out stream of the synthetic benchmark (the demo model trained on streams 0 and 1)."""
DEMO_MIXED = {"fine_detail": "region", "counting": "reencode", "existence": "free", "spatial": "direct"}
FORCED = {
    "region": ["<|region_token_start|><|x_3|><|x_4|><|y_3|><|y_4|><|region_token_end|><|im_end|>"],
    "clip": ["<|clip_action_start|><|clip_action|><|clip_action_end|>"],
    "none": [],
}


def questions(args) -> list[tuple[dict, dict]]:
    """(input, config) per question."""
    runs = []
    for i in range(args.questions):
        if args.arch == "demo":
            family = "fine_detail" if args.routes == "region" else FAMILIES[i % len(FAMILIES)]
            item = make_item(SEED, i, (family,))
            mode = "region" if args.routes == "region" else DEMO_MIXED[family]
            runs.append(({"image": item.image, "q": item.question}, {"configurable": {"mode": mode}}))
        else:
            route = "region" if args.routes == "region" else list(FORCED)[i % len(FORCED)]
            image = torch.randint(0, 256, (3, args.image, args.image), dtype=torch.uint8,
                                  generator=torch.Generator().manual_seed(i))
            runs.append(({"image": image, "q": f"What is written on sign {i}?"},
                         {"configurable": {"force": FORCED[route]}}))
    return runs


def one_at_a_time(graph, runs):
    out, latencies = [], []
    for inputs, config in runs:
        start = time.perf_counter()
        out.append(graph.invoke(inputs, config))
        latencies.append(time.perf_counter() - start)
    return out, latencies


def batch(graph, runs):
    start, out, latencies = time.perf_counter(), [None] * len(runs), [0.0] * len(runs)
    for i, result in graph.batch_as_completed([r[0] for r in runs], [r[1] for r in runs]):
        out[i], latencies[i] = result, time.perf_counter() - start
    return out, latencies


def threads(graph, runs):
    def ask(run):
        start = time.perf_counter()
        result = graph.invoke(*run)
        return result, time.perf_counter() - start

    with ThreadPoolExecutor(len(runs)) as pool:
        pairs = list(pool.map(ask, runs))
    return [p[0] for p in pairs], [p[1] for p in pairs]


def tasks(graph, runs):
    async def ask(run):
        start = time.perf_counter()
        result = await graph.ainvoke(*run)
        return result, time.perf_counter() - start

    async def ask_all():
        return await asyncio.gather(*(ask(run) for run in runs))

    pairs = asyncio.run(ask_all())
    return [p[0] for p in pairs], [p[1] for p in pairs]


def session(graph, runs):
    """The upper bound of batching these questions: all rows in one synchronous `VPTSession` (one
    prefill, decoding together, the crops, one more prefill), no graph and no threads. Region mode
    with the graph's default options only."""
    nodes = graph.nodes["mllm"].bound.func.__self__
    model, tokenizer = nodes.model, nodes.tokenizer
    start = time.perf_counter()
    images = [load_image(inputs["image"]) for inputs, _ in runs]
    rows = VPTSession(model, tokenizer)
    rows.start(images, [build_question(inputs["q"], "region") for inputs, _ in runs])
    first = rows.generate(nodes.options.max_new_tokens)
    for i, image in enumerate(images):
        parsed = parse_actions(first[i].text, (image.shape[2], image.shape[1]))
        if parsed.kind == "region":
            rows.add_regions(i, crops(image, [region.box for region in parsed.regions]))
        else:
            rows.finish(i)
    second = rows.generate(nodes.options.max_new_tokens)
    answers = [tokenizer.decode((second.get(i) or first[i]).token_ids, skip_special_tokens=True).strip()
               for i in range(len(runs))]
    return [{"answer": answer} for answer in answers], [time.perf_counter() - start] * len(runs)


class Components:
    """Seconds spent in the ViT, the LLM and the image preprocessing of every batch (`--breakdown`)."""

    def __init__(self, model) -> None:
        import vpt_agent.model.batch as batch_module
        import vpt_agent.perception.reencode as reencode_module

        self.seconds: dict[str, float] = {}
        self._lock = threading.Lock()  # tools run in the graph's threads
        self._wrap(model.model.visual, "forward", "ViT")
        self._wrap(model.model.language_model, "forward", "LLM")
        for module in (batch_module, reencode_module):
            self._wrap(module, "qwen_pixel_values", "image prep")

    def _wrap(self, owner, name: str, part: str) -> None:
        inner = getattr(owner, name)

        def timed(*args, **kwargs):
            start = time.perf_counter()
            try:
                return inner(*args, **kwargs)
            finally:
                with self._lock:
                    self.seconds[part] = self.seconds.get(part, 0.0) + time.perf_counter() - start

        setattr(owner, name, timed)

    def take(self) -> dict[str, float]:
        """The seconds since the last call."""
        with self._lock:
            seconds, self.seconds = self.seconds, {}
        return seconds


MODES = {"one at a time": one_at_a_time, "graph.batch": batch, "threads": threads, "ainvoke": tasks, "session": session}


class PeakMemory:
    """Peak resident memory of this process (reset per mode where Linux allows), or GPU memory allocated."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")
        except OSError:
            pass

    def read(self) -> float:
        """MiB."""
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        status = Path("/proc/self/status").read_text()
        return int(next(line for line in status.splitlines() if line.startswith("VmHWM")).split()[1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["demo", "2b"], default="demo")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--questions", type=int, default=16)
    parser.add_argument("--routes", choices=["region", "mixed"], default="region")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    parser.add_argument("--image", type=int, default=504, help="--arch 2b: square image side in pixels")
    parser.add_argument("--answer-tokens", type=int, default=32, help="--arch 2b: tokens per round")
    parser.add_argument("--breakdown", action="store_true",
                        help="also print the ViT / LLM / image preprocessing time per question of each mode")
    parser.add_argument("--modes", default="one at a time,graph.batch,threads,ainvoke",
                        help="comma-separated, from: " + ", ".join(MODES) + " (session: --routes region only)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.arch == "demo":
        model, tokenizer = default_model()
        model.to(device, dtype)
        graph = build_graph(model, tokenizer=tokenizer)
    else:
        model, tokenizer = build("2b", device, dtype)
        graph = build_graph(model, tokenizer=tokenizer, max_new_tokens=args.answer_tokens)
    runs = questions(args)
    modes = [m.strip() for m in args.modes.split(",")]
    components = Components(model) if args.breakdown else None
    with torch.no_grad():
        for inputs, config in runs[:4]:  # warm-up
            graph.invoke(inputs, config)
    memory = PeakMemory(device)
    walls: dict[str, list[float]] = {m: [] for m in modes}
    latencies: dict[str, list[float]] = {m: [] for m in modes}
    peaks: dict[str, list[float]] = {m: [] for m in modes}
    parts: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    expected = None
    for _ in range(args.repeats):
        for mode in modes:
            memory.reset()
            if components:
                components.take()
            start = time.perf_counter()
            results, seconds = MODES[mode](graph, runs)
            walls[mode].append(time.perf_counter() - start)
            if components:
                parts[mode].append(components.take())
            peaks[mode].append(memory.read())
            latencies[mode] += seconds
            answers = [r["answer"] for r in results]
            expected = expected or answers
            if answers != expected:
                sys.exit(f"{mode}: answers differ from the first mode's")
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu, {args.threads} threads"
    print(f"arch={args.arch} device={args.device} ({name}) dtype={args.dtype} questions={args.questions} "
          f"routes={args.routes} repeats={args.repeats}; answers identical in every mode")
    base = statistics.median(walls[modes[0]])
    print(f"| {'mode':14s} | {'all N (s)':>9s} | {'questions/s':>11s} | {'vs ' + modes[0]:>16s} | "
          f"{'p50 (ms)':>8s} | {'p95 (ms)':>8s} | {'peak MiB':>8s} |")
    print("|" + "|".join("-" * n for n in (16, 11, 13, 18, 10, 10, 10)) + "|")
    for mode in modes:
        wall = statistics.median(walls[mode])
        lat = sorted(latencies[mode])
        p95 = lat[min(len(lat) - 1, round(0.95 * (len(lat) - 1)))]
        print(f"| {mode:14s} | {wall:9.3f} | {args.questions / wall:11.1f} | {base / wall:15.2f}x | "
              f"{statistics.median(lat) * 1000:8.1f} | {p95 * 1000:8.1f} | {max(peaks[mode]):8.0f} |")
    if components:
        print_breakdown(modes, walls, parts, args.questions)


def print_breakdown(modes, walls, parts, n: int) -> None:
    """Milliseconds per question in each part (medians over the repeats), and the ratio to the first
    mode that the model's parts alone allow."""
    names = ["ViT", "LLM", "image prep"]
    print(f"\nms per question | {'mode':14s} | " + " | ".join(f"{p:>10s}" for p in [*names, "model", "rest"]) + " |")
    base = statistics.median(walls[modes[0]])
    for mode in modes:
        ms = {p: statistics.median(r.get(p, 0.0) for r in parts[mode]) * 1000 / n for p in names}
        model = sum(ms.values())
        rest = statistics.median(walls[mode]) * 1000 / n - model
        print(f"ms per question | {mode:14s} | " + " | ".join(f"{v:10.1f}" for v in [*ms.values(), model, rest])
              + f" |  ratio bound {base * 1000 / n / model:.2f}x")


if __name__ == "__main__":
    main()
