"""Memory and speed of `vpt-agent train` on Qwen2-VL-2B shapes (random weights, clip branch).

    python tools/bench_train.py                                   # CPU: LoRA, 3 steps, float32
    python tools/bench_train.py --device cuda --bf16 --steps 20   # one GPU
    python tools/bench_train.py --method full --gradient-checkpointing

Builds a random VPT model with Qwen2-VL-2B's shapes (28 LLM layers of 1536, a 32-layer ViT of 1280,
151936-token vocabulary), saves it with the synthetic benchmark's region conversations in the
VPT_Datasets format (the question, the region turn, its crop, the answer), then runs the trainer of
`vpt-agent train` on them in a fresh process and reports: parameters (all, trained), the peak memory
while it trains (resident memory on the CPU; `torch.cuda.max_memory_allocated` on a GPU) and while it
loads the model, the median seconds per optimizer step after the first, and tokens per second (all,
and supervised ones).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_session import build  # noqa: E402  (the random Qwen2-VL-2B-shaped model)

from vpt_agent.evaluation.datasets import export_synthetic  # noqa: E402

CHILD = """
import json, sys, time, torch
from transformers import TrainerCallback
from vpt_agent.training import trainer
from vpt_agent.training.options import SFTOptions

options = SFTOptions(**json.loads(sys.argv[1]))
steps, tokens, counted = [], {"all": 0, "supervised": 0}, {}

def resident_peak():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmHWM:"))

class Timer(TrainerCallback):
    def on_train_begin(self, args, state, control, **kw):
        counted["loaded"] = resident_peak()
        with open("/proc/self/clear_refs", "w") as refs: refs.write("5")  # the peak from here on
        if torch.cuda.is_available(): torch.cuda.reset_peak_memory_stats()
    def on_step_begin(self, args, state, control, **kw): counted["start"] = time.perf_counter()
    def on_step_end(self, args, state, control, **kw): steps.append(time.perf_counter() - counted["start"])
    def on_train_end(self, args, state, control, **kw):
        counted["peak"] = torch.cuda.max_memory_allocated() if torch.cuda.is_available() else resident_peak()

collate = trainer.Collator.__call__
def counting(self, samples):
    batch = collate(self, samples)
    tokens["all"] += int(batch["attention_mask"].sum()); tokens["supervised"] += int((batch["labels"] != -100).sum())
    return batch
trainer.Collator.__call__ = counting
import transformers
original = transformers.Trainer.__init__
def with_timer(self, *a, **k):
    original(self, *a, **k); self.add_callback(Timer())
    counted["params"] = sum(p.numel() for p in self.model.parameters())
    counted["trained"] = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
transformers.Trainer.__init__ = with_timer
trainer.train(options)
print(json.dumps({"steps": steps, "tokens": tokens, "peak_bytes": counted["peak"], "loading_bytes": counted["loaded"],
                  "device": "cuda" if torch.cuda.is_available() else "cpu",
                  "params": counted["params"], "trained": counted["trained"]}))
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--method", choices=["lora", "full"], default="lora")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--layers", type=int, default=None, help="LLM and ViT depth (a shallow smoke run)")
    parser.add_argument("--work", type=Path, help="folder for the model and data (default: a temporary one)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        work = args.work or Path(tmp)
        base, data = work / "base", work / "data" / "region_train.json"
        if not (base / "config.json").exists():
            model, tokenizer = build("2b", torch.device("cpu"), torch.bfloat16, args.layers)
            model.save_pretrained(base)  # bfloat16 on disk; the trainer loads it in float32
            tokenizer.save_pretrained(base)
            del model
        if not data.exists():
            export_synthetic(data, max(16, args.steps * args.batch_size), mode="region")
        shutil.rmtree(work / "out", ignore_errors=True)  # a fresh run each time
        options = dict(base=str(base), data=[str(data)], out=str(work / "out"), method=args.method,
                       max_steps=args.steps, batch_size=args.batch_size, bf16=args.bf16,
                       gradient_checkpointing=args.gradient_checkpointing, save_steps=10**6, logging_steps=1,
                       progress=False, lr=1e-5)
        env = {"CUDA_VISIBLE_DEVICES": ""} if args.device == "cpu" else {}
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(options)], capture_output=True, text=True,
                              env={**os.environ, **env})
        if done.returncode != 0:
            sys.exit(done.stderr[-4000:])
        result = json.loads(done.stdout.strip().splitlines()[-1])
    steps = result["steps"][1:] or result["steps"]
    step = statistics.median(steps)
    per_step = {k: v / len(result["steps"]) for k, v in result["tokens"].items()}
    print(f"Qwen2-VL-2B shapes{' (' + str(args.layers) + ' layers)' if args.layers else ''}, {args.method}, "
          f"device={result['device']}, {'bf16 autocast' if args.bf16 else 'float32'}"
          f"{', gradient checkpointing' if args.gradient_checkpointing else ''}, batch {args.batch_size}, "
          f"{args.steps} steps (median of steps 2..{args.steps})")
    print(f"parameters {result['params'] / 1e9:.3f} B, trained {result['trained'] / 1e6:.1f} M")
    print(f"peak memory while training {result['peak_bytes'] / 2**30:.2f} GiB "
          f"({'GPU allocated' if result['device'] == 'cuda' else 'resident'}); "
          f"resident peak while loading {result['loading_bytes'] / 2**30:.2f} GiB")
    print(f"s/step {step:.2f}; tokens/step {per_step['all']:.0f} ({per_step['supervised']:.0f} supervised); "
          f"tokens/s {per_step['all'] / step:.1f}")


if __name__ == "__main__":
    main()
