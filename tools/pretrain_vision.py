"""A vision stage before `tools/train_demo.py`: the demo model's ViT and merger alone, trained to
name the object in each merged token, so its image tokens differ before the LLM reads them.

    python3 tools/pretrain_vision.py --steps 200 --out vision_ckpt     # ~2 min on 2 CPU cores
    python3 tools/train_demo.py --device cpu --resume vision_ckpt --out demo_ckpt ...

Trained through the LLM alone, the image tokens' features converge to one shared direction and
the model does not learn even a lone object's colour (tools/results/diagnose_demo_cpu.txt). Here
a linear head on the merger's output classifies every merged token of a training scene (stream
5, not a benchmark stream) as "no object" or the (colour, shape) of the object whose centre lies
in it; the head is dropped and a new demo checkpoint is written (train_state.pt at step 0, no
optimizer state) for train_demo.py to resume from.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from vpt_agent.data.synthetic import COLOURS, SHAPES, Item, make_item
from vpt_agent.model.modeling import VPTForConditionalGeneration
from vpt_agent.perception.qwen_image import qwen_pixel_values
from vpt_agent.train import DEMO_MAX_PIXELS, TRAIN_STATE, demo_config, demo_tokenizer

STREAM = 5
NAMES = [(c, s) for c in COLOURS for s in SHAPES]


def token_labels(item: Item, rows: int, cols: int) -> torch.Tensor:
    """(rows * cols,) class per merged token: 0, or 1 + the index in NAMES of the object centred in it."""
    labels = torch.zeros(rows, cols, dtype=torch.long)
    width, height = item.size
    for obj in item.objects:
        cx, cy = obj.centre
        labels[int(cy * rows / height), int(cx * cols / width)] = 1 + NAMES.index((obj.colour, obj.shape))
    return labels.flatten()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = demo_tokenizer()
    model = VPTForConditionalGeneration(demo_config(tokenizer)).train()
    visual = model.model.visual
    head = torch.nn.Linear(model.config.text_config.hidden_size, 1 + len(NAMES))
    params = [*visual.parameters(), *head.parameters()]
    optimizer = torch.optim.AdamW(params, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.05)
    weight = torch.ones(1 + len(NAMES))
    weight[0] = 0.1  # most tokens hold no object
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        items = [make_item(STREAM, step * args.batch_size + k, ("fine_detail",)) for k in range(args.batch_size)]
        pixel_values, grid = qwen_pixel_values([item.image for item in items], max_pixels=DEMO_MAX_PIXELS)
        labels = torch.cat([token_labels(item, h // 2, w // 2) for item, (_, h, w) in zip(items, grid.tolist())])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = head(torch.cat(model.model.get_image_features(pixel_values, grid).pooler_output)).float()
        loss = torch.nn.functional.cross_entropy(logits, labels, weight=weight)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 25 == 0:
            objects = labels > 0
            accuracy = (logits.argmax(-1)[objects] == labels[objects]).float().mean().item()
            print(f"step {step}: loss {loss.item():.3f}, object tokens named right {accuracy:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)
    model.save_pretrained(args.out)
    tokenizer.save_pretrained(args.out)
    torch.save({"step": 0, "elapsed": 0.0}, args.out / TRAIN_STATE)


if __name__ == "__main__":
    main()
