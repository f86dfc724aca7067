"""`vpt-agent ask IMAGE QUESTION` (or `ask --example`): answer a question about an image with the VPT
graph, printing the answer and the regions the model looked at (`--json`: one JSON document);
`vpt-agent eval DATASET.json --out DIR`: score it on a dataset (`vpt_agent.evaluation`);
`vpt-agent train --base DIR --data FILE.json --out DIR`: fine-tune a VPT checkpoint (`vpt_agent.training`).

Errors print one line to stderr and exit 1 (2 for usage errors); warnings and notices print one line
each to stderr. `ask` checks its arguments and input before torch is imported, so mistakes answer at
once; then it says on stderr what model it loads.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn

from .errors import ConfigError, VPTError
from .evaluation.cli import add_eval_parser, add_placement_arguments, run_eval
from .training.cli import add_train_parser, run_train

PROG = "vpt-agent"
DEMO_NOTE = (
    "the bundled demo model knows only the synthetic scenes it was trained on (coloured shapes holding small "
    "characters, as in --example); this image does not look like one, so the answer means little. "
    "--model PATH loads a real VPT checkpoint"
)
"""Printed (and in --json) when the demo model answers about an image `looks_synthetic` rejects."""
_EMPTY = {"answer": "", "actions": [], "regions": [], "steps": [], "warnings": []}
"""The result fields of a --json document for a run that could not start."""


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Visual Perception Tokens for Qwen2-VL as a LangGraph state machine.")
    parser.add_argument("--version", action="version", version=f"{PROG} {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ask = commands.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", nargs="?", help="image file")
    ask.add_argument("question", nargs="?", help="the question")
    ask.add_argument("--example", action="store_true",
                     help="ask the bundled example question about the bundled example image")
    ask.add_argument("--model", metavar="PATH", help="VPT checkpoint directory (default: the bundled demo model)")
    ask.add_argument("--json", action="store_true",
                     help="print one JSON document: image, question, answer, actions, regions, steps, error, "
                          "warnings and note")
    ask.add_argument("--trace", metavar="PNG", help="draw the regions, crops, question and answer to this file")
    ask.add_argument("--max-steps", type=int, default=2, metavar="N", help="perception steps allowed (default 2)")
    ask.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens per round (default 64)")
    add_placement_arguments(ask, "the GPU if there is one, else the CPU")
    ask.add_argument(
        "--mode", choices=("region", "reencode", "free", "direct"), default="region",
        help="prompt: the paper's region / reencode suffix, free (no suffix) or direct (no perception)",
    )
    add_eval_parser(commands)
    add_train_parser(commands)
    return parser


def _version() -> str:
    try:
        return version(PROG)
    except PackageNotFoundError:  # a source tree that was never installed
        return "(not installed)"


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warn_in_one_line
            return {"ask": _ask, "eval": run_eval, "train": run_train}[args.command](args)
    except (VPTError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
        if getattr(args, "json", False):  # still one document on stdout: the run that did not happen
            error = f"{type(exc).__name__}: {exc}"
            print(json.dumps({"image": args.image, "question": args.question, **_EMPTY, "error": error, "note": None},
                             indent=2, ensure_ascii=False))
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI promises one line, not a traceback
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


def _ask(args: argparse.Namespace) -> int:
    from .images import read_image_file, validate_question  # numpy and PIL, no torch

    image, question = _inputs(args)
    pixels = read_image_file(image)  # fail fast, before torch and the model load
    question = validate_question(question)
    if args.trace:
        _check_trace_path(args.trace)
    graph = _load_graph(args)
    result = graph.invoke({"image": pixels, "q": question})
    note = None if args.model else _demo_note(pixels)
    _print_result(args, image, question, result, note)
    return _finish(pixels, result, args.trace)


def _inputs(args: argparse.Namespace) -> tuple[str, str]:
    """(image path, question): the user's, or the shipped example's."""
    from .example import example

    if args.example:
        if args.image or args.question:
            raise ConfigError("--example asks its own question; give no image or question with it")
        shipped = example()
        return str(shipped.image), shipped.question
    if args.image is None or args.question is None:
        raise ConfigError("give an image and a question (or --example)")
    return args.image, args.question


def _check_trace_path(path: str) -> None:
    """A `ConfigError` now, before the model loads, if the --trace file cannot be written."""
    problem = _unwritable(Path(path))
    if problem:
        raise ConfigError(f"--trace: cannot write {path}: {problem}")


def _unwritable(path: Path) -> str | None:
    """Why `path` cannot be written, or None."""
    try:
        if path.is_dir():
            return "it is a directory"
        if not path.parent.is_dir():
            return f"no such directory {path.parent}"
        writable = os.access(path if path.exists() else path.parent, os.W_OK)
    except OSError as exc:  # e.g. a name too long
        return exc.strerror or str(exc)
    return None if writable else "permission denied"


def _load_graph(args: argparse.Namespace) -> Any:
    """The graph on the model asked for, after one line on stderr naming the model and its placement."""
    from .placement import placement  # imports torch

    device, dtype = placement(args.device, args.dtype)
    name = args.model or "the bundled demo model"
    print(f"{PROG}: loading {name} ({device}, {str(dtype).removeprefix('torch.')})...", file=sys.stderr)
    from .graph import build_graph

    return build_graph(
        args.model, device=args.device, dtype=args.dtype, compile=args.compile, max_perception_steps=args.max_steps,
        max_new_tokens=args.max_new_tokens, mode=args.mode,
    )


def _demo_note(pixels: Any) -> str | None:
    """`DEMO_NOTE` for an image the demo model was not trained on, else None."""
    from .data.synthetic import looks_synthetic

    return None if looks_synthetic(pixels) else DEMO_NOTE


def _print_result(args: argparse.Namespace, image: str, question: str, result: Mapping[str, Any],
                  note: str | None) -> None:
    """The answer on stdout (one JSON document with --json); warnings and the note on stderr."""
    from .state import result_json

    if args.json:
        document = {"image": image, "question": question, **result_json(result), "note": note}
        print(json.dumps(document, indent=2, ensure_ascii=False))
    else:
        print(f"{image}\nQ: {question}\nA: {result['answer']}" if args.example else result["answer"])
        for action in result["actions"]:
            print(_describe(action))
        for warning in result["warnings"]:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if note:
        print(f"{PROG}: note: {note}", file=sys.stderr)


def _finish(pixels: Any, result: Mapping[str, Any], trace: str | None) -> int:
    """After the answer: the run's error and the trace of `pixels`; 1 if either failed."""
    from .trace import render_trace

    code = 0
    if result["error"]:  # no usable answer
        print(f"{PROG}: error: {result['error']}", file=sys.stderr)
        code = 1
    if trace:
        try:
            render_trace(pixels, result, trace)
        except OSError as exc:  # e.g. its folder went away while the model ran
            print(f"{PROG}: error: --trace: cannot write {trace}: {exc.strerror or exc}", file=sys.stderr)
            code = 1
    return code


def _describe(action: dict) -> str:
    """One line per perception step: the cells and pixel box of each region, or the branch."""
    if action["kind"] != "region":
        return f"re-encoded with {action['reencode']['branch']}"
    parts = []
    for region in action["regions"]:
        x0, y0, x1, y1 = region["cells"]
        x0b, y0b, x1b, y1b = region["box"]
        parts.append(f"cells x {x0}-{x1}, y {y0}-{y1} of 8x8 -> crop ({x0b}, {y0b})-({x1b}, {y1b}) px")
    return "region: " + "; ".join(parts)


if __name__ == "__main__":
    sys.exit(main())
