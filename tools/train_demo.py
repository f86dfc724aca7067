"""Train the bundled demo VPT model on the synthetic benchmark (see vpt_agent/train.py).

    python3 tools/train_demo.py --device cpu --minutes 60 --batch-size 16 --workers 0 --out demo_ckpt
    python3 tools/train_demo.py --device cuda --minutes 30 --out demo_ckpt
    python3 tools/train_demo.py --device cuda --resume demo_ckpt --out demo_ckpt --run-minutes 5
    python3 tools/train_demo.py --device cpu --init demo_ckpt --branches dino,clip --clip-max-pixels 200704 --out clip_ckpt

writes demo_ckpt/{model.safetensors,config.json,tokenizer*} (the bundle), train_state.pt and
optimizer.pt (for --resume; without optimizer.pt a resume re-warms the learning rate) and
log.jsonl (loss, lr, throughput, evaluations).
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import fields
from pathlib import Path

from vpt_agent.train import TrainArgs, train


def main() -> None:
    defaults = TrainArgs(out=Path("demo_ckpt"))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=defaults.out, help="checkpoint directory")
    parser.add_argument("--resume", type=Path, help="continue from this checkpoint directory (its train_state.pt)")
    parser.add_argument("--init", type=Path,
                        help="start a new training from this checkpoint's weights (its config changed by the options below)")
    parser.add_argument("--branches", help="re-encoding branches of the model, comma-separated (e.g. dino,clip)")
    parser.add_argument("--clip-max-pixels", type=int,
                        help="the clip branch's pixel budget (re-encoding the whole image beyond the global view's)")
    parser.add_argument("--tasks", type=json.loads, default=defaults.tasks,
                        help='the task mix as JSON, e.g. {"region": 0.3, "reencode": 0.3} (default: TASKS)')
    parser.add_argument("--families", type=json.loads, default=defaults.families,
                        help='the question families\' mix as JSON, e.g. {"fine_detail": 0.5, "counting": 0.5} '
                             '(default: FAMILY_MIX)')
    parser.add_argument("--minutes", type=float,
                        help="time budget of all runs of this checkpoint together (then save and evaluate)")
    parser.add_argument("--run-minutes", type=float,
                        help="this run's own time limit: the learning rate restarts (warmup, cosine to 10 %%) over it")
    parser.add_argument("--device", choices=["cuda", "cpu"], default=defaults.device)
    for name in ("steps", "vision_steps", "batch_size", "warmup", "seed", "workers", "eval_every", "eval_items",
                 "log_every"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=getattr(defaults, name))
    for name in ("lr", "weight_decay", "vision_weight", "focus_weight"):
        parser.add_argument(f"--{name.replace('_', '-')}", type=float, default=getattr(defaults, name))
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")  # the tokenizer runs again in forked workers
    overrides = {}
    if args.branches:
        overrides["vision_encoder_ls"] = args.branches.split(",")
    if args.clip_max_pixels:
        overrides["clip_max_pixels"] = args.clip_max_pixels
    args.config_overrides = overrides
    result = train(TrainArgs(**{f.name: getattr(args, f.name) for f in fields(TrainArgs) if hasattr(args, f.name)}))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
