"""`vpt-agent ask IMAGE QUESTION` (or `ask --example`): answer a question about an image with the VPT
graph, printing the answer and the regions the model looked at;
`vpt-agent eval DATASET.json --out DIR`: score it on a dataset (`vpt_agent.evaluation`).

Errors print one line to stderr and exit 1 (2 for usage errors); warnings print one line each.
"""
from __future__ import annotations

import argparse
import json
import sys
import warnings
from collections.abc import Sequence
from typing import NoReturn

from .errors import ConfigError, VPTError
from .evaluation.cli import add_eval_parser, add_placement_arguments, run_eval

PROG = "vpt-agent"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        print(f"{PROG}: error: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(2)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog=PROG, description="Visual Perception Tokens for Qwen2-VL as a LangGraph state machine.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    ask = commands.add_parser("ask", help="answer a question about an image")
    ask.add_argument("image", nargs="?", help="image file")
    ask.add_argument("question", nargs="?", help="the question")
    ask.add_argument("--example", action="store_true",
                     help="ask the bundled example question about the bundled example image")
    ask.add_argument("--model", metavar="PATH", help="VPT checkpoint directory (default: the bundled demo model)")
    ask.add_argument("--json", action="store_true", help="print answer, actions, regions, steps and error as JSON")
    ask.add_argument("--trace", metavar="PNG", help="draw the regions, crops, question and answer to this file")
    ask.add_argument("--max-steps", type=int, default=2, metavar="N", help="perception steps allowed (default 2)")
    ask.add_argument("--max-new-tokens", type=int, default=64, metavar="N", help="tokens per round (default 64)")
    add_placement_arguments(ask, "the GPU if there is one, else the CPU")
    ask.add_argument(
        "--mode", choices=("region", "reencode", "free", "direct"), default="region",
        help="prompt: the paper's region / reencode suffix, free (no suffix) or direct (no perception)",
    )
    add_eval_parser(commands)
    return parser


def _warn_in_one_line(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _warn_in_one_line
            return _ask(args) if args.command == "ask" else run_eval(args)
    except (VPTError, OSError) as exc:
        print(f"{PROG}: error: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # the CLI promises one line, not a traceback
        print(f"{PROG}: internal error: {type(exc).__name__}: {exc}", file=sys.stderr)
    return 1


def _ask(args: argparse.Namespace) -> int:
    from .graph import build_graph  # heavy imports only once the arguments are valid
    from .images import load_image, validate_question
    from .model.demo import example
    from .state import result_json
    from .trace import render_trace

    if args.example:
        if args.image or args.question:
            raise ConfigError("--example asks its own question; give no image or question with it")
        shipped = example()
        args.image, args.question = str(shipped.image), shipped.question
        print(f"{shipped.image}\nQ: {shipped.question}")
    elif args.image is None or args.question is None:
        raise ConfigError("give an image and a question (or --example)")
    image = load_image(args.image)  # fail fast, before loading the model
    question = validate_question(args.question)
    graph = build_graph(
        args.model, device=args.device, dtype=args.dtype, compile=args.compile, max_perception_steps=args.max_steps,
        max_new_tokens=args.max_new_tokens, mode=args.mode,
    )
    result = graph.invoke({"image": image, "q": question})
    if args.trace:
        render_trace(result, args.trace)
    if args.json:
        print(json.dumps(result_json(result), indent=2, ensure_ascii=False))
    else:
        print(("A: " if args.example else "") + result["answer"])
        for action in result["actions"]:
            print(_describe(action))
        for warning in result["warnings"]:
            print(f"{PROG}: warning: {warning}", file=sys.stderr)
    if result["error"]:  # no usable answer
        print(f"{PROG}: error: {result['error']}", file=sys.stderr)
        return 1
    return 0


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
