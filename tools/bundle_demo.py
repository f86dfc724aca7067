"""Bundle a trained demo checkpoint into the package.

    python3 tools/bundle_demo.py demo_ckpt

copies the model (config.json, model.safetensors) and its tokenizer from a checkpoint written by
``tools/train_demo.py`` into ``vpt_agent/assets/demo/``, where `vpt_agent.model.demo.default_model`
loads it; the training state and log stay behind. Check it first with
``vpt-agent eval --synthetic --model demo_ckpt --per-family 500 --out runs/demo``.
"""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from vpt_agent.example import ASSETS
from vpt_agent.model.demo import DEMO_DIR, default_model
from vpt_agent.train import OPTIMIZER_STATE, TRAIN_STATE

LEFT_BEHIND = {TRAIN_STATE, OPTIMIZER_STATE, "log.jsonl"}
LIMIT = 25 * 2**20
"""Everything under vpt_agent/assets together."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a checkpoint directory written by tools/train_demo.py")
    args = parser.parse_args()
    if DEMO_DIR.exists():
        shutil.rmtree(DEMO_DIR)
    DEMO_DIR.mkdir(parents=True)
    for file in sorted(args.checkpoint.iterdir()):
        if file.is_file() and file.name not in LEFT_BEHIND:
            shutil.copy2(file, DEMO_DIR / file.name)
    default_model()  # loads, and the tokenizer agrees with the config
    size = sum(f.stat().st_size for f in ASSETS.rglob("*") if f.is_file())
    if size > LIMIT:
        raise SystemExit(f"vpt_agent/assets holds {size / 2**20:.1f} MiB, over the {LIMIT / 2**20:.0f} MiB limit")
    print(f"bundled {sorted(f.name for f in DEMO_DIR.iterdir())}; assets {size / 2**20:.1f} MiB")


if __name__ == "__main__":
    main()
