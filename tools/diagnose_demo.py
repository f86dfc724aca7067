"""Which skill does a demo checkpoint lack? Teacher-forced token accuracy per skill on held-out data.

    python3 tools/diagnose_demo.py CKPT [--items 64]

For held-out conversations (stream 1, which training never draws from) it prints the accuracy
and loss of the next-token prediction at the supervised tokens, grouped by what they are:

* ``region x`` / ``region y``: the cell tokens of region mode's first round (fine_detail);
* ``answer after crop``: the glyph, with the crop shown (region mode's second round);
* ``ground x`` / ``ground y`` / ``ground name``: the grounding task (`grounding_example`);
* ``read``: the glyph from the crop alone; ``block read``: the 9 glyphs of `block_reading_example`;
* ``spatial relation``: where one object lies from another (the answer's first token), answered from
  the global view (direct mode).

Then how much of the image tokens' features differs between the tokens of one image (the mean
norm of each token's deviation from the image's mean token, over the mean norm) at the ViT's
last block, after the merger's LayerNorm and at the merger's output (what the LLM receives): a
ViT whose tokens all point one way gives the LLM little to tell objects from background.
"""
from __future__ import annotations

import argparse
from collections import defaultdict

import torch

from vpt_agent.data.conversations import IGNORE, block_reading_example, build_example, grounding_example, reading_example
from vpt_agent.data.synthetic import GLYPHS, SPATIAL_ANSWERS, make_item
from vpt_agent.model.loading import load_tokenizer
from vpt_agent.model.modeling import VPTForConditionalGeneration
from vpt_agent.tokens import X_TOKENS, Y_TOKENS
from vpt_agent.train import collate

HELD_OUT = 1
ONLY_IN = {"name": "ground", "relation": "spatial"}
"""Token kinds scored in one task only (elsewhere their ids are words of other texts)."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--items", type=int, default=64)
    args = parser.parse_args()
    model = VPTForConditionalGeneration.from_pretrained(args.checkpoint).eval()
    tokenizer = load_tokenizer(args.checkpoint)
    budget = model.config.image_max_pixels
    kinds = {  # the supervised tokens scored, by what they are (any other: "name")
        **dict.fromkeys(tokenizer.convert_tokens_to_ids(list(X_TOKENS)), "x"),
        **dict.fromkeys(tokenizer.convert_tokens_to_ids(list(Y_TOKENS)), "y"),
        **{tokenizer(text, add_special_tokens=False)["input_ids"][-1]: "glyph" for g in GLYPHS for text in (g, " " + g)},
        **{tokenizer(word, add_special_tokens=False)["input_ids"][0]: "relation" for word in SPATIAL_ANSWERS},
    }
    items = [make_item(HELD_OUT, i, ("fine_detail",)) for i in range(args.items)]
    relations = [make_item(HELD_OUT, i, ("spatial",)) for i in range(args.items)]
    tasks = {
        "region": [build_example(item, "region", tokenizer, max_pixels=budget) for item in items],
        "ground": [grounding_example(item, tokenizer, max_pixels=budget) for item in items],
        "read": [reading_example(item, tokenizer, max_pixels=budget) for item in items],
        "block": [block_reading_example(HELD_OUT, i, tokenizer, max_pixels=budget) for i in range(args.items // 4)],
        "spatial": [build_example(item, "direct", tokenizer, max_pixels=budget) for item in relations],
    }
    for task, examples in tasks.items():
        stats: dict[str, list[float]] = defaultdict(lambda: [0, 0, 0.0])  # n, correct, loss
        for start in range(0, len(examples), 16):
            batch = collate(examples[start : start + 16], model)
            with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(**batch, use_cache=False).logits.float()
            labels = batch["labels"][:, 1:]
            logits = logits[:, :-1]
            losses = torch.nn.functional.cross_entropy(logits.transpose(1, 2), labels, ignore_index=IGNORE,
                                                       reduction="none")
            correct = logits.argmax(-1) == labels
            for row, col in (labels != IGNORE).nonzero().tolist():
                token = int(labels[row, col])
                kind = kinds.get(token, "name")
                if ONLY_IN.get(kind, task) != task:
                    continue
                entry = stats[kind]
                entry[0] += 1
                entry[1] += int(correct[row, col])
                entry[2] += float(losses[row, col])
        for kind, (n, right, loss) in sorted(stats.items()):
            print(f"{task:7s} {kind:8s} accuracy {right / n:.2f}  loss {loss / n:.2f}  (n={n})", flush=True)
    for name, ratio in feature_spread(model, tasks["ground"][:8]).items():
        print(f"image tokens' spread at the {name}: {ratio:.1%} of their norm")


def feature_spread(model, examples) -> dict[str, float]:
    """Per image-token layer: mean |token - image mean| / mean |token| over ``examples``' first images."""
    visual, outputs = model.model.visual, {}
    layers = {"ViT last block": visual.blocks[-1], "merger LayerNorm": visual.merger.ln_q, "merger output": visual.merger}
    hooks = [layer.register_forward_hook(lambda _m, _i, out, name=name: outputs.setdefault(name, []).append(out))
             for name, layer in layers.items()]
    with torch.no_grad():
        for e in examples:
            tokens = int(e.image_grid_thw[0].prod())
            model.model.get_image_features(e.pixel_values[:tokens], e.image_grid_thw[:1])
    for hook in hooks:
        hook.remove()
    spread = {}
    for name, outs in outputs.items():
        ratios = []
        for out in outs:
            x = (out[0] if isinstance(out, tuple) else out).float().flatten(0, -2)
            ratios.append(((x - x.mean(0)).norm(dim=-1).mean() / x.norm(dim=-1).mean()).item())
        spread[name] = sum(ratios) / len(ratios)
    return spread


if __name__ == "__main__":
    main()
