"""`vpt-agent eval DATASET.json --out DIR` and `vpt-agent eval --synthetic --seed S --per-family N --out DIR`:
the subcommand's arguments, and running it."""
from __future__ import annotations

import argparse
import sys

from ..errors import ConfigError
from ..prompts import PROMPT_SUFFIXES
from .metrics import METRICS

SYNTHETIC_SEED = 1000


def add_eval_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``eval`` to the CLI's subcommands."""
    parser = commands.add_parser("eval", help="score the graph on a VPT_Datasets file or the synthetic benchmark")
    parser.add_argument("dataset", nargs="?", help="VPT_Datasets JSON file, e.g. TextVQA_region_test.json")
    parser.add_argument("--synthetic", action="store_true",
                        help="the synthetic benchmark instead of a file (default modes: all four, metric exact)")
    parser.add_argument("--seed", type=int, default=SYNTHETIC_SEED, metavar="SEED",
                        help=f"--synthetic: the held-out stream (default {SYNTHETIC_SEED}; the demo model "
                             "trained on streams 0 and 1)")
    parser.add_argument("--per-family", type=_positive, default=100, metavar="N",
                        help="--synthetic: questions per family (default 100)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="predictions.jsonl and summaries go here; an existing DIR is resumed")
    parser.add_argument("--model", metavar="PATH", help="VPT checkpoint directory (default: the bundled demo model)")
    parser.add_argument("--mode", type=_modes, metavar="MODE[,MODE...]",
                        help="prompt mode(s), compared side by side: direct, region, reencode, free "
                             "(default: the split's own suffix)")
    parser.add_argument("--metric", choices=sorted(METRICS),
                        help="score (default by the dataset's name: DocVQA/DUDE anls, POPE yesno, "
                             "*VQA/GQA vqa, else exact)")
    parser.add_argument("--batch-size", type=_positive, default=16, metavar="N",
                        help="questions a rank runs at once, batched on its model; their lines are written "
                             "together (default 16)")
    parser.add_argument("--limit", type=_positive, metavar="N", help="only the first N items")
    parser.add_argument("--workers", type=_positive, default=1, metavar="N",
                        help="ranks on this machine: processes spread over its GPUs, if any (default 1)")
    parser.add_argument("--max-steps", type=int, default=2, metavar="N", help="perception steps allowed (default 2)")
    parser.add_argument("--max-new-tokens", type=_positive, default=64, metavar="N",
                        help="tokens per round (default 64)")
    add_placement_arguments(parser, "each rank's GPU, else the CPU")
    parser.add_argument("--judge", metavar="URL",
                        help="also score with an LLM judge at this OpenAI-compatible endpoint (key: OPENAI_API_KEY)")
    parser.add_argument("--judge-model", default="gpt-4o", metavar="NAME", help="the judge's model (default gpt-4o)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_placement_arguments(parser: argparse.ArgumentParser, default_device: str) -> None:
    """--device, --dtype and --compile (of `ask` and `eval`)."""
    parser.add_argument("--device", help=f"cpu, cuda, cuda:1, ... (default: {default_device})")
    parser.add_argument("--dtype", choices=("float32", "bfloat16", "float16"),
                        help="model weights (default: bfloat16 on a GPU, float32 on the CPU)")
    parser.add_argument("--compile", action="store_true",
                        help="decode over a static KV cache with compiled steps (CUDA graphs; on the CPU no faster; "
                             "the first answers pay the compilation)")


def run_eval(args: argparse.Namespace) -> int:
    """Evaluate, print summary.md; exit 1 when some items failed (a re-run retries them)."""
    from .datasets import synthetic_dataset  # heavy imports only once the arguments are valid
    from .runner import EvalSpec, evaluate, render_summary

    if args.synthetic == (args.dataset is not None):
        raise ConfigError("give a dataset file or --synthetic (one of them)")
    dataset, modes, metric = args.dataset, args.mode, args.metric
    if args.synthetic:
        dataset = synthetic_dataset(args.seed, args.per_family)
        modes, metric = modes or list(PROMPT_SUFFIXES), metric or "exact"
    spec = EvalSpec(
        model=args.model, metric=metric, max_new_tokens=args.max_new_tokens, max_steps=args.max_steps,
        batch_size=args.batch_size, device=args.device, dtype=args.dtype, compile=args.compile, judge_url=args.judge,
        judge_model=args.judge_model,
    )
    summary = evaluate(dataset, args.out, modes=modes, limit=args.limit, workers=args.workers, spec=spec,
                       progress=not args.no_progress)
    if summary is None:  # a rank other than 0 of a launched run
        return 0
    print(render_summary(summary), end="")
    if summary["failed"]:
        first = summary["failed"][0]
        print(f"vpt-agent: error: {len(summary['failed'])} items failed (first: {first['id']}: {first['error']}); "
              f"run the same command again to retry them", file=sys.stderr)
        return 1
    return 0


def _modes(text: str) -> list[str]:
    modes = [mode.strip() for mode in text.split(",") if mode.strip()]
    if not modes or set(modes) - set(PROMPT_SUFFIXES):
        raise argparse.ArgumentTypeError(
            f"expected modes from {', '.join(PROMPT_SUFFIXES)}, comma-separated; got {text!r}"
        )
    return modes


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return value
