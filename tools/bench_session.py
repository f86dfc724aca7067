"""Benchmark a VPT region answer with KV-cache reuse against a plain answer and against the
reference-style recompute, side by side in one run.

    python tools/bench_session.py                          # tiny model, CPU
    python tools/bench_session.py --arch 2b --device cuda --dtype bfloat16   # Qwen2-VL-2B shapes
    python tools/bench_session.py --arch 2b --device cuda --dtype bfloat16 --compile   # + static cache, CUDA graphs

Every variant produces the same number of tokens: the answer is teacher-forced (`forced=`) to
`--answer-tokens` tokens, so random weights cannot stop early; each step still runs the full
forward. The reference-style baseline recomputes the whole conversation for every new token with
two inner passes (the paper's `num_inner_forward_run = 2`, whose first pass runs at every step).
With `--compile` the plain and VPT answers also run decoding over the static cache with compiled
steps (`compile=True`); their first (warm-up) run, which pays the compilation, is printed too.
Load time and peak memory while loading: `tools/bench_loading.py`.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from vpt_agent.model.config import VPTConfig
from vpt_agent.model.modeling import VPTForConditionalGeneration
from vpt_agent.model.reference import rope_index
from vpt_agent.model.session import VPTSession
from vpt_agent.model.tiny import tiny_config, tiny_vpt_model
from vpt_agent.model.tokenizer import build_char_tokenizer
from vpt_agent.perception.crop import crop
from vpt_agent.perception.qwen_image import qwen_pixel_values
from vpt_agent.tokens import parse_actions

REGION = "<|region_token_start|><|x_3|><|x_4|><|y_3|><|y_4|><|region_token_end|><|im_end|>"

# Qwen2-VL-2B-Instruct's architecture (random weights: only the shapes matter here).
QWEN2_VL_2B = dict(
    vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
    num_attention_heads=12, num_key_value_heads=2, rms_norm_eps=1e-6, rope_theta=1e6,
    rope_scaling={"type": "mrope", "mrope_section": [16, 24, 24]}, max_position_embeddings=32768,
    tie_word_embeddings=True, initializer_range=0.02,
    vision_config={"depth": 32, "embed_dim": 1280, "num_heads": 16, "mlp_ratio": 4, "hidden_size": 1536,
                   "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
)


def build(arch: str, device: torch.device, dtype: torch.dtype, layers: int | None = None):
    if arch == "tiny":
        model, tokenizer = tiny_vpt_model(branches=("clip",))
        return model.to(device, dtype), tokenizer
    tokenizer = build_char_tokenizer()
    overrides = dict(QWEN2_VL_2B)
    if layers is not None:  # a shallow smoke test of the same shapes
        overrides["num_hidden_layers"] = layers
        overrides["vision_config"] = {**overrides["vision_config"], "depth": layers}
    config: VPTConfig = tiny_config(tokenizer, branches=("clip",), **overrides)
    torch.manual_seed(0)
    with device:
        model = VPTForConditionalGeneration(config)
    return model.to(dtype).eval(), tokenizer


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=["tiny", "2b"], default="tiny")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--image", type=int, default=504, help="square image side in pixels")
    parser.add_argument("--answer-tokens", type=int, default=32)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--layers", type=int, default=None, help="override LLM and ViT depth (smoke tests)")
    parser.add_argument("--compile", action="store_true", help="also the compiled static-cache decoding")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    model, tokenizer = build(args.arch, device, dtype, args.layers)
    image = torch.randint(0, 256, (3, args.image, args.image), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(0)).to(device)
    question = "What is written on the small sign in the middle?"
    enc = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    answer = enc(("the answer is " * 8)[: args.answer_tokens])
    region = enc(REGION)
    box = parse_actions(REGION, (args.image, args.image)).regions[0].box

    phases: dict[str, list[float]] = {}

    def mark(name: str, since: float) -> float:
        sync(device)
        now = time.perf_counter()
        phases.setdefault(name, []).append(now - since)
        return now

    def plain(compile: bool = False):
        tag = "compiled " if compile else ""
        t = time.perf_counter()
        session = VPTSession(model, tokenizer, compile=compile)
        session.start([image], [question])
        session.generate(1, forced={0: answer[:1]})
        t = mark(f"{tag}plain: prefill + 1st token", t)
        session.generate(len(answer) - 1, forced={0: answer[1:]})
        mark(f"{tag}plain: rest of answer", t)

    def vpt_region(compile: bool = False):
        tag = "compiled " if compile else ""
        t = time.perf_counter()
        session = VPTSession(model, tokenizer, compile=compile)
        session.start([image], [question])
        session.generate(1, forced={0: region[:1]})
        t = mark(f"{tag}vpt: prefill + 1st token", t)
        session.generate(len(region) - 1, forced={0: region[1:]})
        t = mark(f"{tag}vpt: region tokens", t)
        session.add_regions(0, [crop(image, box)])
        session.generate(1, forced={0: answer[:1]})
        t = mark(f"{tag}vpt: crop turn + 1st answer token", t)
        session.generate(len(answer) - 1, forced={0: answer[1:]})
        mark(f"{tag}vpt: rest of answer", t)
        return session.conversation(0)

    conversation = vpt_region()
    pixel_values, grid = qwen_pixel_values([image, crop(image, box)])
    first_prompt = next(i for i in range(len(conversation)) if conversation[i : i + len(region)] == region)
    second_prompt = len(conversation) - len(answer)
    steps = [*range(first_prompt, first_prompt + len(region)), *range(second_prompt, len(conversation))]

    @torch.no_grad()
    def reference():
        """Every generated token from full passes over the whole conversation so far (no cache)."""
        for end in steps:
            ids = torch.tensor([conversation[:end]], device=device)
            images = 2 if end >= second_prompt else 1
            rows = int(grid[:images].prod(-1).sum())
            kwargs = dict(input_ids=ids, pixel_values=pixel_values[:rows], image_grid_thw=grid[:images],
                          position_ids=rope_index(model, ids, grid[:images]), use_cache=False, logits_to_keep=1)
            for _ in range(model.config.num_inner_forward_run):
                model(**kwargs)

    variants = [("plain answer", plain), ("VPT region, KV reuse", vpt_region),
                ("VPT region, reference recompute", reference)]
    if args.compile:
        variants += [("plain answer, compiled", lambda: plain(True)),
                     ("VPT region, compiled", lambda: vpt_region(True))]
    results, warm_up = {}, {}
    with torch.no_grad():
        for name, fn in variants:
            sync(device)
            start = time.perf_counter()
            fn()  # warm-up (the compiled variants compile here)
            sync(device)
            warm_up[name] = time.perf_counter() - start
            times = []
            for _ in range(args.runs):
                sync(device)
                start = time.perf_counter()
                fn()
                sync(device)
                times.append(time.perf_counter() - start)
            results[name] = statistics.median(times)
    print(f"arch={args.arch} device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}) "
          f"dtype={args.dtype} image={args.image}x{args.image} answer_tokens={len(answer)} runs={args.runs} "
          f"threads={args.threads} layers={model.config.text_config.num_hidden_layers} round-2 prompt tokens={second_prompt}")
    base = results["plain answer"]
    for name, seconds in results.items():
        print(f"  {name:34s} median {seconds * 1000:9.1f} ms   {seconds / base:5.2f}x plain")
    ratio = results["VPT region, reference recompute"] / results["VPT region, KV reuse"]
    print(f"  KV reuse is {ratio:.2f}x faster than the reference-style recompute")
    if args.compile:
        compiled = results["VPT region, compiled"]
        print(f"  compiled: VPT region {compiled / results['plain answer, compiled']:.2f}x the compiled plain answer, "
              f"{results['VPT region, reference recompute'] / compiled:.2f}x faster than the reference recompute; "
              f"warm-up runs {warm_up['plain answer, compiled']:.1f} s (plain) + {warm_up['VPT region, compiled']:.1f} s (VPT)")
    print("  phases (median ms): " + ", ".join(f"{k} {statistics.median(v) * 1000:.1f}" for k, v in phases.items()))
    if args.compile:
        dynamic, compiled = (greedy(model, tokenizer, image, question, box, len(answer), compile) for compile in (False, True))
        print(f"  greedy tokens (no forcing; the region answer, {len(answer)} tokens) compiled == dynamic: "
              f"{compiled == dynamic}")


@torch.no_grad()
def greedy(model, tokenizer, image, question: str, box, tokens: int, compile: bool) -> list[list[int]]:
    """The model's own greedy tokens, round by round, over a region turn (random weights: any text)."""
    session = VPTSession(model, tokenizer, compile=compile)
    session.start([image], [question])
    rounds = [session.generate(tokens)[0].token_ids]
    session.add_regions(0, [crop(image, box)])
    return [*rounds, session.generate(tokens)[0].token_ids]


if __name__ == "__main__":
    main()
