"""`vpt-agent train --base DIR --data FILE.json [--data ...] --out DIR`: the subcommand's arguments, a
--config file's, and running it (in each process of `torchrun` / `accelerate launch -m vpt_agent.cli train`)."""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ..tokens import BRANCHES
from .options import SFTOptions


def add_train_parser(commands: argparse._SubParsersAction) -> None:
    """Add ``train`` to the CLI's subcommands. Options left out keep the --config file's value, else
    `SFTOptions`' default."""
    parser = commands.add_parser("train", help="fine-tune a VPT (or plain Qwen2-VL) checkpoint on VPT_Datasets files",
                                 argument_default=argparse.SUPPRESS)
    parser.add_argument("--base", metavar="DIR",
                        help="the checkpoint to start from: a VPT one, or a plain Qwen2-VL / Qwen2.5-VL one (the VPT "
                             "tokens, fields and the --branch's encoder and projector are added)")
    parser.add_argument("--data", action="append", metavar="FILE.json",
                        help="a VPT_Datasets file (repeat to mix several)")
    parser.add_argument("--out", metavar="DIR", help="checkpoints, then the trained model, go here")
    parser.add_argument("--branch", choices=tuple(BRANCHES),
                        help="train every re-encoding turn as this branch's (default: the branch each turn names); "
                             "on a plain --base, the branch the model gets (default clip: its own ViT)")
    parser.add_argument("--dino", metavar="FILE", help="a plain --base's DINOv2 weights for --branch dino (timm / "
                        "transformers safetensors or .pth; architecture: dino_config in --config, default DINOv2-L)")
    parser.add_argument("--sam", metavar="FILE", help="a plain --base's SAM weights for --branch sam (segment-anything's "
                        ".pth or safetensors; architecture: sam_config in --config, default SAM ViT-L)")
    method = parser.add_mutually_exclusive_group()
    method.add_argument("--lora", dest="method", action="store_const", const="lora",
                        help="LoRA adapters on the LLM's linear layers, merged on save (the default)")
    method.add_argument("--full", dest="method", action="store_const", const="full", help="full fine-tuning of the LLM")
    method.add_argument("--projectors", dest="method", action="store_const", const="projectors",
                        help="the VPT projectors alone: the paper's alignment stage, before --lora or --full")
    parser.add_argument("--max-steps", type=int, metavar="N", help="optimizer steps (default 1000)")
    parser.add_argument("--batch-size", type=int, metavar="N", help="conversations per process and step (default 1)")
    parser.add_argument("--grad-accum", type=int, metavar="N", help="gradient accumulation steps (default 1)")
    parser.add_argument("--lr", type=float, metavar="X", help="peak learning rate (default 1e-4 LoRA, 1e-5 full, 1e-3 projectors)")
    parser.add_argument("--warmup-steps", type=int, metavar="N", help="linear warmup, then cosine (default 0)")
    parser.add_argument("--lora-rank", type=int, metavar="R", help="LoRA rank (default 16; lora_alpha in --config, default 32)")
    parser.add_argument("--no-merge", dest="merge_lora", action="store_false",
                        help="save the LoRA adapter alone instead of the merged model")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (default: float32)")
    parser.add_argument("--gradient-checkpointing", action="store_true", help="recompute activations in backward")
    parser.add_argument("--save-steps", type=int, metavar="N", help="checkpoint every N steps (default 500)")
    parser.add_argument("--logging-steps", type=int, metavar="N", help="log the loss every N steps (default 10)")
    parser.add_argument("--report-to", type=_names, metavar="NAME[,NAME...]",
                        help="transformers integrations to log to: tensorboard, wandb, ... (default none)")
    parser.add_argument("--no-progress", dest="progress", action="store_false",
                        help="no progress bar (steps, elapsed, ETA) and logged losses on stderr")
    parser.add_argument("--seed", type=int, metavar="N", help="seed of the LoRA init and the data order (default 42)")
    parser.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    parser.add_argument("--config", metavar="FILE", help="a .yaml or .json file of these options (underscored names)")


def run_train(args: argparse.Namespace) -> int:
    """Train and print where the model was saved (stdout holds nothing else)."""
    config = getattr(args, "config", None)
    given = {key: value for key, value in vars(args).items() if key not in ("command", "config")}
    values = {**(_read_config(Path(config)) if config else {}), **given}
    for required in ("base", "data", "out"):
        if required not in values:
            raise ConfigError(f"--{required} is required (on the command line or in --config)")
    if isinstance(values["data"], str):
        values["data"] = [values["data"]]
    if isinstance(values.get("report_to"), str):
        values["report_to"] = _names(values["report_to"])
    options = SFTOptions(**values)
    options.check()
    for data in options.data:
        if not Path(data).is_file():
            raise ConfigError(f"--data: no such file: {data}")

    from .trainer import train  # heavy imports only once the arguments are valid

    out = train(options)
    if os.environ.get("RANK", "0") == "0":  # torchrun / accelerate launch: the first process says it once
        print(out)
    return 0


def _read_config(path: Path) -> dict[str, Any]:
    """The options of a --config file; a `ConfigError` for an unreadable file or an unknown name."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"--config: cannot read {path}: {exc.strerror or exc}") from None
    try:
        values = _parse(text, path.suffix)
    except ValueError as exc:
        raise ConfigError(f"--config: {path} is not valid {path.suffix[1:] or 'JSON'}: {exc}") from None
    if not isinstance(values, dict):
        raise ConfigError(f"--config: {path} must hold a mapping of option names to values")
    known = {f.name for f in fields(SFTOptions)}
    if unknown := sorted(set(values) - known):
        raise ConfigError(f"--config: unknown option(s) {unknown}; expected some of {sorted(known)}")
    return values


def _parse(text: str, suffix: str) -> Any:
    """YAML for .yaml / .yml, else JSON; a `ValueError` for text that is neither."""
    if suffix not in (".yaml", ".yml"):
        return json.loads(text)
    import yaml

    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(str(exc).replace("\n", " ")) from None


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]
