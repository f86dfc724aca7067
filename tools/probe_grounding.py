"""How fast can the demo model's LLM learn to name a cell? A probe without the ViT or images.

    python3 tools/probe_grounding.py --task marker --steps 300
    python3 tools/probe_grounding.py --task lookup --steps 2000

Each example is the demo conversation's round 1 with an 8x8 grid of image slots (M-RoPE numbered
as for a 224x224 image) whose input embeddings are made up here instead of coming from the ViT,
then the region tokens of one cell as the target:

* ``marker``: noise in every slot, one slot marked ("Where is the mark?") - position only;
* ``lookup``: 4-8 objects, each a fixed random colour vector plus a shape vector in its slot
  ("Where is the red circle?") - the question must select one object by both attributes.

Prints the loss and the x / y accuracy every 100 steps (batch 64, bf16 autocast, AdamW 2e-3).
"""
from __future__ import annotations

import argparse
import time

import torch

from vpt_agent.data.synthetic import COLOURS, SHAPES
from vpt_agent.model.modeling import VPTForConditionalGeneration
from vpt_agent.model.reference import rope_index
from vpt_agent.tokens import NUM_CUT, REGION_START, X_TOKENS, Y_TOKENS
from vpt_agent.train import demo_config, demo_tokenizer

PROMPT = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n<|vision_start|>"
BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("marker", "lookup"), default="lookup")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--theta", type=float, help="M-RoPE theta (default: the demo config's)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = demo_tokenizer()
    config = demo_config(tokenizer, **({"rope_theta": args.theta} if args.theta else {}))
    model = VPTForConditionalGeneration(config)
    lm, head = model.model.language_model, model.lm_head
    hidden, slots = config.text_config.hidden_size, NUM_CUT * NUM_CUT

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    start = ids(PROMPT)
    xs = torch.tensor(tokenizer.convert_tokens_to_ids(list(X_TOKENS)))
    ys = torch.tensor(tokenizer.convert_tokens_to_ids(list(Y_TOKENS)))
    colour_vectors, shape_vectors = torch.randn(len(COLOURS), hidden), torch.randn(len(SHAPES), hidden)
    marker = torch.randn(hidden) * 2

    def question(name: str) -> list[int]:
        return ids(f"<|vision_end|>\nWhere is the {name}?<|im_end|>\n<|im_start|>assistant\n{REGION_START}")

    def example() -> tuple[list[int], torch.Tensor]:
        content = torch.randn(slots, hidden) * 0.5
        if args.task == "marker":
            cell = int(torch.randint(slots, ()))
            content[cell] += marker
            text = question("mark")
        else:
            count = int(torch.randint(4, 9, ()))
            cells, pairs = torch.randperm(slots)[:count], torch.randperm(len(COLOURS) * len(SHAPES))[:count]
            for c, p in zip(cells, pairs):
                content[c] += colour_vectors[p // len(SHAPES)] + shape_vectors[p % len(SHAPES)]
            k = int(torch.randint(count, ()))
            cell, pair = int(cells[k]), int(pairs[k])
            text = question(f"{list(COLOURS)[pair // len(SHAPES)]} {SHAPES[pair % len(SHAPES)]}")
        row = start + [config.image_token_id] * slots + text + [int(xs[cell % NUM_CUT]), int(ys[cell // NUM_CUT])]
        return row, content

    optimizer = torch.optim.AdamW([*lm.parameters(), *head.parameters()], lr=2e-3, betas=(0.9, 0.95),
                                  weight_decay=0.05)
    grid = torch.tensor([[1, 2 * NUM_CUT, 2 * NUM_CUT]] * BATCH)
    positions = None
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        rows, contents = zip(*(example() for _ in range(BATCH)))
        if len({len(r) for r in rows}) > 1:
            raise SystemExit("the questions tokenize to different lengths")
        batch = torch.tensor(rows)
        if positions is None:  # every row has the same layout
            positions = rope_index(model, batch, grid)
        embeds = lm.get_input_embeddings()(batch)
        embeds[:, len(start) : len(start) + slots] = torch.stack(contents)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            states = lm(inputs_embeds=embeds, position_ids=positions).last_hidden_state
            logits = head(states[:, -3:-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, -2:].flatten())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0:
            x_acc, y_acc = (logits.argmax(-1) == batch[:, -2:]).float().mean(0).tolist()
            print(f"{args.task} step {step}: loss {loss.item():.3f}, x {x_acc:.2f}, y {y_acc:.2f} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
