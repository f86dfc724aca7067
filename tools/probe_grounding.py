"""How fast can the demo model's LLM learn to name a cell? A probe without the ViT or images.

    python3 tools/probe_grounding.py --task marker --steps 300
    python3 tools/probe_grounding.py --task lookup --steps 2000

Each example is the demo conversation's round 1 with an 8x8 grid of image slots (M-RoPE numbered
as for a 224x224 image) whose input embeddings are made up here instead of coming from the ViT,
then the region tokens of one cell as the target:

* ``marker``: noise in every slot, one slot marked ("Where is the mark?") - position only;
* ``lookup``: 4-8 objects (``--objects``), each a fixed random colour vector plus a shape vector in
  its slot ("Where is the red circle?") - the question must select one object by both attributes;
* ``colour``: as lookup, every colour at most once (one attribute selects the object);
* ``adjacent``: as lookup, the name right before the region tokens, as in a grounding answer.

Knobs: ``--theta`` / ``--sections`` (M-RoPE), ``--hidden``, ``--lr``, ``--marker-steps`` (a
marker curriculum first), ``--y-first`` (the row token first), ``--position-features`` (each slot
also holds its row and column vectors, as the demo ViT's are trained to), ``--attention-loss
LAYER`` (head 0 of LAYER also trained to attend to the named object: `vpt_agent.train.focus_loss`).
Prints the loss and the first / second region token's accuracy every 100 steps (batch 64, bf16
autocast, AdamW).
Logs: tools/results/probe_grounding_*.txt.
"""
from __future__ import annotations

import argparse
import time

import torch

from vpt_agent.data.conversations import GROUNDING_QUESTION
from vpt_agent.data.synthetic import COLOURS, SHAPES
from vpt_agent.model.modeling import VPTForConditionalGeneration
from vpt_agent.model.reference import rope_index
from vpt_agent.prompts import ASSISTANT, DEFAULT_SYSTEM
from vpt_agent.tokens import NUM_CUT, REGION_START, X_TOKENS, Y_TOKENS
from vpt_agent.train import demo_config, demo_tokenizer, focus_loss

PROMPT = f"<|im_start|>system\n{DEFAULT_SYSTEM}<|im_end|>\n<|im_start|>user\n<|vision_start|>"
BATCH = 64


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=("marker", "lookup", "colour", "adjacent"), default="lookup")
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--theta", type=float, help="M-RoPE theta (default: the demo config's)")
    parser.add_argument("--sections", type=int, nargs=3, help="M-RoPE sections (default: the demo config's)")
    parser.add_argument("--marker-steps", type=int, default=0, help="first train this many steps on marker")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--y-first", action="store_true", help="the row token before the column token")
    parser.add_argument("--hidden", type=int, help="LLM width (heads of 32)")
    parser.add_argument("--objects", type=int, nargs=2, default=(4, 8), help="objects per example (lookup)")
    parser.add_argument("--position-features", action="store_true",
                        help="every slot also holds a row and a column vector (what a ViT trained per token gives)")
    parser.add_argument("--attention-loss", type=int, metavar="LAYER",
                        help="also train head 0 of LAYER to attend from the region tokens' inputs to the object")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    tokenizer = demo_tokenizer()
    overrides = {"rope_theta": args.theta} if args.theta else {}
    if args.sections:
        overrides["rope_scaling"] = {"type": "mrope", "mrope_section": args.sections}
    if args.hidden:
        overrides.update(hidden=args.hidden, intermediate_size=3 * args.hidden, num_attention_heads=args.hidden // 32,
                         num_key_value_heads=args.hidden // 64)
    config = demo_config(tokenizer, **overrides)
    model = VPTForConditionalGeneration(config)
    lm, head = model.model.language_model, model.lm_head
    if args.attention_loss is not None:
        model.set_attn_implementation("eager")
    hidden, slots = config.text_config.hidden_size, NUM_CUT * NUM_CUT

    def ids(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    start = ids(PROMPT)
    xs = torch.tensor(tokenizer.convert_tokens_to_ids(list(X_TOKENS)))
    ys = torch.tensor(tokenizer.convert_tokens_to_ids(list(Y_TOKENS)))
    colour_vectors, shape_vectors = torch.randn(len(COLOURS), hidden), torch.randn(len(SHAPES), hidden)
    marker = torch.randn(hidden) * 2
    row_vectors, column_vectors = torch.randn(NUM_CUT, hidden) * 0.5, torch.randn(NUM_CUT, hidden) * 0.5

    def question(name: str) -> list[int]:
        return ids(f"<|vision_end|>\nWhere is the {name}?{ASSISTANT}{REGION_START}")

    def example(task: str) -> tuple[list[int], torch.Tensor]:
        content = torch.randn(slots, hidden) * 0.5
        if args.position_features:
            content += (row_vectors[:, None] + column_vectors[None]).flatten(0, 1)
        if task == "marker":
            cell = int(torch.randint(slots, ()))
            content[cell] += marker
            text = question("mark")
        else:
            count = int(torch.randint(args.objects[0], args.objects[1] + 1, ()))
            cells, pairs = torch.randperm(slots)[:count], torch.randperm(len(COLOURS) * len(SHAPES))[:count]
            if task == "colour":  # every colour at most once: one attribute selects the object
                colours = torch.randperm(len(COLOURS))[: min(count, len(COLOURS))]
                count, cells = len(colours), cells[: len(colours)]
                pairs = colours * len(SHAPES) + torch.randint(len(SHAPES), (count,))
            for c, p in zip(cells, pairs):
                content[c] += colour_vectors[p // len(SHAPES)] + shape_vectors[p % len(SHAPES)]
            k = int(torch.randint(count, ()))
            cell, pair = int(cells[k]), int(pairs[k])
            name = f"{list(COLOURS)[pair // len(SHAPES)]} {SHAPES[pair % len(SHAPES)]}"
            if task == "adjacent":  # the name right before the region tokens, as a grounding answer has it
                text = ids(f"<|vision_end|>\n{GROUNDING_QUESTION}{ASSISTANT}{name}{REGION_START}")
            else:
                text = question(name)
        target = [int(xs[cell % NUM_CUT]), int(ys[cell // NUM_CUT])]
        row = start + [config.image_token_id] * slots + text + (target[::-1] if args.y_first else target)
        return row, content, cell

    optimizer = torch.optim.AdamW([*lm.parameters(), *head.parameters()], lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=0.05)
    positions = None
    t0 = time.perf_counter()
    for step in range(1, args.steps + 1):
        task = "marker" if step <= args.marker_steps else args.task
        pool = [example(task) for _ in range(4 * BATCH)]
        length = len(pool[0][0])  # the names tokenize to different lengths: keep one per batch
        rows, contents, cells = zip(*[e for e in pool if len(e[0]) == length][:BATCH])
        batch = torch.tensor(rows)
        if positions is None or positions.shape[1:] != batch.shape:  # every row has the same layout
            positions = rope_index(model, batch, torch.tensor([[1, 2 * NUM_CUT, 2 * NUM_CUT]] * len(rows)))
        embeds = lm.get_input_embeddings()(batch)
        embeds[:, len(start) : len(start) + slots] = torch.stack(contents)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = lm(inputs_embeds=embeds, position_ids=positions, output_attentions=args.attention_loss is not None)
            logits = head(out.last_hidden_state[:, -3:-1]).float()
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), batch[:, -2:].flatten())
        if args.attention_loss is not None:  # the two region tokens' inputs onto the object's slot
            length, slot = batch.shape[1], torch.tensor(cells) + len(start)
            focus = torch.cat([torch.stack([torch.arange(len(rows)), torch.full_like(slot, length - k), slot,
                                            torch.zeros_like(slot)], 1)
                               for k in (3, 2)])
            focused = focus_loss(out.attentions[args.attention_loss], focus)
            loss = loss + focused
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 100 == 0:
            x_acc, y_acc = (logits.argmax(-1) == batch[:, -2:]).float().mean(0).tolist()
            focus = "" if args.attention_loss is None else f" focus loss {focused.item():.2f},"
            print(f"{task} step {step}: loss {loss.item():.3f}, x {x_acc:.2f}, y {y_acc:.2f},{focus} "
                  f"({time.perf_counter() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
