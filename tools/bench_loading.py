"""Load time and peak anonymous memory of `VPTForConditionalGeneration.from_pretrained`, for a random
checkpoint in our safetensors layout and in the released one (transformers-4.45 names, sharded
`pytorch_model-*.bin` pickles with an index), loaded in float32 and in bfloat16.

    python tools/bench_loading.py                 # Qwen2-VL-2B shapes with 4 layers (~2 GB in float32)
    python tools/bench_loading.py --layers 8 --dir /tmp/ckpts

Each load runs in a fresh process whose anonymous resident memory (`RssAnon`: memory-mapped checkpoint
files are file-backed and not counted) this process samples every millisecond; the peak above the
level before loading is compared with the size of the weights in the target dtype.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_session import build  # noqa: E402  (Qwen2-VL-2B shapes, random weights)

MEASURE = """
import json, sys, time
from pathlib import Path
import torch
from vpt_agent.model import VPTForConditionalGeneration

path, dtype = sys.argv[1], getattr(torch, sys.argv[2])
print("loading", flush=True)
input()  # the parent has read the level before loading
start = time.perf_counter()
model = VPTForConditionalGeneration.from_pretrained(path, dtype=dtype)
seconds = time.perf_counter() - start
storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in model.state_dict().values()}
assert torch.get_default_dtype() == torch.float32
print(json.dumps({"seconds": seconds, "weights_mib": sum(storages.values()) / 2**20}), flush=True)  # tied once
"""


def anon_mib(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(next(line for line in status.splitlines() if line.startswith("RssAnon")).split()[1]) / 1024


def measure(path: Path, dtype: str) -> dict:
    """Load in a child process; its anonymous memory sampled from here every millisecond (a sampler
    inside the loading process would miss peaks while the loader holds the GIL)."""
    child = subprocess.Popen([sys.executable, "-c", MEASURE, str(path), dtype], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    assert child.stdout.readline().strip() == "loading"
    base = peak = anon_mib(child.pid)
    result: list[str] = []
    reader = threading.Thread(target=lambda: result.append(child.stdout.readline()))
    child.stdin.write("\n")
    child.stdin.flush()
    reader.start()
    while reader.is_alive():
        try:
            peak = max(peak, anon_mib(child.pid))
        except (OSError, StopIteration):
            break
        time.sleep(0.001)
    reader.join()
    child.wait()
    return {**json.loads(result[0]), "peak_mib": peak - base}


RELEASED_NAMES = (("model.language_model.", "model."), ("model.visual.", "visual."))
"""Our key prefixes -> transformers-4.45's (the released checkpoints' names)."""


def save_released(model, out: Path, shards: int) -> None:
    """The released layout: 4.45 key names in `shards` `.bin` pickles and their index."""
    out.mkdir(parents=True, exist_ok=True)
    model.config.save_pretrained(out)
    state = {}
    for key, value in model.state_dict().items():
        for ours, theirs in RELEASED_NAMES:
            if key.startswith(ours):
                key = theirs + key[len(ours):]
                break
        state[key] = value.detach().contiguous()
    state.pop("lm_head.weight", None)  # tied
    keys, weight_map = sorted(state), {}
    for i in range(shards):
        name = f"pytorch_model-{i + 1:05d}-of-{shards:05d}.bin"
        torch.save({k: state[k] for k in keys[i::shards]}, out / name)
        weight_map.update({k: name for k in keys[i::shards]})
    (out / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=4, help="LLM and ViT depth of the Qwen2-VL-2B shapes")
    parser.add_argument("--shards", type=int, default=2, help="`.bin` shards of the released layout")
    parser.add_argument("--dir", help="where to write the checkpoints (default: a temporary folder)")
    args = parser.parse_args()
    root = Path(args.dir or tempfile.mkdtemp(prefix="vpt-bench-loading-"))
    model, _ = build("2b", torch.device("cpu"), torch.float32, args.layers)
    model.save_pretrained(root / "safetensors")
    save_released(model, root / "released", args.shards)
    size = sum(p.numel() * 4 for p in model.parameters()) / 2**30  # tied weights once
    del model
    print(f"Qwen2-VL-2B shapes, {args.layers} layers: {size:.2f} GB of weights in float32; {root}")
    print(f"| {'layout':22s} | {'dtype':8s} | {'load (s)':>8s} | {'weights (MiB)':>13s} | {'peak anon (MiB)':>15s} | "
          f"{'peak / weights':>14s} |")
    print("|" + "|".join("-" * n for n in (24, 10, 10, 15, 17, 16)) + "|")
    for layout, name in (("safetensors", "safetensors"), ("released .bin shards", "released")):
        for dtype in ("float32", "bfloat16"):
            r = measure(root / name, dtype)
            print(f"| {layout:22s} | {dtype:8s} | {r['seconds']:8.2f} | {r['weights_mib']:13.0f} | "
                  f"{r['peak_mib']:15.0f} | {r['peak_mib'] / r['weights_mib']:13.2f}x |")


if __name__ == "__main__":
    main()
