"""Supervised training of the bundled demo model: a small Qwen2-VL VPT model with a DINO branch,
trained from scratch on the synthetic benchmark's conversations (all four prompt modes, and three
auxiliary tasks), with bf16 autocast on the CPU as on a GPU. Two training-only losses come with the
LLM's: `TokenHead` (what each image token shows) and `focus_loss` (a head looks at each object a
token is about); an optional vision stage (`TrainArgs.vision_steps`) trains the ViT alone first.

Conversations are generated on the fly (by DataLoader workers, if any; item ``i`` of the stream is a
function of the seed and ``i``, so a resumed run sees the batches it would have seen). The
learning rate warms up linearly, then follows a cosine to 10 % over whichever ends first, the
step budget or the time budget (or, with `TrainArgs.run_minutes`, over this run alone).
`evaluate` answers held-out items greedily through `VPTSession`.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from functools import partial
from itertools import chain
from typing import Literal
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from .data.conversations import (
    BLOCK_QUESTION,
    GROUNDING_QUESTION,
    IGNORE,
    Example,
    block_reading_example,
    build_example,
    grounding_example,
    padded_batch,
    reading_example,
)
from .data.synthetic import FAMILIES, Family, Item, make_item, question_corpus
from .data.token_labels import COLUMNS, View, block_view, labelled_view
from .model.config import VPTConfig
from .model.loading import load_tokenizer
from .model.modeling import VPTForConditionalGeneration
from .model.session import VPTSession
from .model.tiny import TINY_DINO, tiny_config
from .model.tokenizer import build_bpe_tokenizer
from .perception.crop import crops
from .perception.reencode import branch_features
from .tokens import ACTION_STARTS, parse_actions
from .prompts import DEFAULT_SYSTEM, REENCODE_PROMPT, REGION_PROMPT, PromptMode, build_question

TASKS: dict[PromptMode | Literal["ground", "read", "read_block", "block_view"], float] = {
    "region": 0.33, "reencode": 0.07, "free": 0.1, "direct": 0.08, "ground": 0.12, "read": 0.1, "read_block": 0.1,
    "block_view": 0.1,
}
"""Task mix: the four prompt modes and three auxiliary tasks with denser, cheaper labels: "ground"
(`grounding_example`: the region of every object, by name), "read" (`reading_example`: a
fine_detail question about its crop alone) and "read_block" (`block_reading_example`: the glyphs
of 9 objects in a crop-sized view); and the vision stage's "block_view" (the ViT alone, ~2.5x
cheaper a step), which keeps its reading from fading under the LLM's loss. free and direct share
the unsuffixed prompt: where free takes a perception round (`conversations.route`) the model learns
to prefer it and, with the action tokens suppressed (the graph's direct mode), to answer from the
global view. Region has the largest share (the mode the demo is judged on); grounding, learnt
early, keeps a smaller one."""
VISION_TASKS: dict[str, float] = {"block_view": 0.75, "global_view": 0.25}
"""The vision stage's `View`s (`TrainArgs.vision_steps`): crop-scale blocks of 9 characters to read
(`block_view`), and global scenes (objects, grid cells)."""
FAMILY_MIX: dict[Family, float] = {"fine_detail": 0.4, "spatial": 0.25, "counting": 0.15, "existence": 0.2}
PERIODIC_MODES: dict[str, tuple[PromptMode, ...]] = {"dino": ("region", "direct"),
                                                     "clip": ("region", "reencode", "direct")}
"""The modes of the evaluations during training (fine_detail items), by re-encoding branch: the clip
branch's re-encoding is to read what direct answering cannot."""
TRAIN_STATE = "train_state.pt"
OPTIMIZER_STATE = "optimizer.pt"
"""AdamW's moments (2x the model): --resume without it starts them afresh and re-warms the rate."""
DEMO_MAX_PIXELS = 224 * 224
"""The demo model's pixel budget: a square global view is 8x8 merged tokens, one per grid cell."""


def reencode_branch(config: VPTConfig) -> str:
    """The branch the demo's re-encoding conversations use: clip (the model's own ViT within its
    re-encoding budget) where the model has it, else DINO."""
    return "clip" if "clip" in config.branches else "dino"


def demo_tokenizer():
    """Byte-level BPE trained on every benchmark question and the fixed template texts (weighted so
    each of their words becomes one token): ~460 ids."""
    fixed = [REGION_PROMPT, REENCODE_PROMPT, DEFAULT_SYSTEM, GROUNDING_QUESTION, BLOCK_QUESTION, "system\n", "user\n",
             "assistant\n", "Region 1: "]
    return build_bpe_tokenizer(question_corpus() + fixed * 1000)


def demo_config(tokenizer, **overrides) -> VPTConfig:
    """The demo architecture (2.1 M parameters, 8.5 MB in fp32): ViT 4x96, LLM 4x128, DINO 3x96, a
    224x224 pixel budget; ``overrides`` replace config fields (tests train smaller ones)."""
    hidden = 128
    fields = dict(
        branches=("dino",),
        hidden=hidden,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        # theta 1e4 (not Qwen2-VL's 1e6: 16 frequencies per head here) keeps slow frequencies for the
        # name -> object match across the prompt; the positions come from the ViT (TokenHead's x / y)
        rope_scaling={"type": "mrope", "mrope_section": [2, 7, 7]},  # head_dim 32
        rope_theta=1e4,
        vision_config={"depth": 4, "embed_dim": 96, "num_heads": 4, "mlp_ratio": 4, "hidden_size": hidden,
                       "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2},
        detection_encoder_config={**TINY_DINO, "hidden_size": 96, "num_hidden_layers": 3, "num_attention_heads": 4},
        initializer_range=0.02,
        image_max_pixels=DEMO_MAX_PIXELS,
    )
    return tiny_config(tokenizer, **{**fields, **overrides})


@dataclass
class TrainArgs:
    out: Path
    steps: int = 3000
    batch_size: int = 16
    lr: float = 2e-3
    warmup: int = 100
    weight_decay: float = 0.05
    minutes: float | None = None
    """Time budget of all runs of this checkpoint together (``elapsed`` in train_state.pt counts on)."""
    run_minutes: float | None = None
    """This run's own time limit, and a warm restart: a fresh warmup, then the cosine from `lr` to
    10 % over these minutes rather than over the step or total time budget (one schedule for a run
    on any machine: a GPU covers in minutes what 2 CPU cores do in hours)."""
    device: str = "cuda"
    seed: int = 0
    workers: int = field(default_factory=lambda: max(1, (os.cpu_count() or 1) - 2))
    eval_every: int = 1000
    eval_items: int = 32
    log_every: int = 10
    vision_steps: int = 0
    """The first steps train the ViT and merger alone on `VISION_TASKS`' views through `TokenHead`
    (~35-43 views/s on 2 CPU cores against ~16-18 conversations/s: reading tiny characters takes the ViT
    a few 1e5 labelled glyphs before it starts)."""
    vision_weight: float = 1.0
    """Weight of `TokenHead`'s loss next to the LLM's."""
    focus_weight: float = 1.0
    """Weight of the attention focus loss (`focus_loss`) next to the LLM's."""
    resume: Path | None = None
    init: Path | None = None
    """Start a new training (step 0, fresh optimizer) from this checkpoint's weights and `TokenHead`,
    its config changed by `config_overrides` (e.g. a clip branch added): what it lacks is initialised."""
    config_overrides: dict = field(default_factory=dict)
    """`demo_config` overrides for a new model, or changes to `init`'s config."""
    tasks: dict[str, float] = field(default_factory=lambda: dict(TASKS))
    """The conversation stage's task mix (`TASKS`)."""
    families: dict[str, float] = field(default_factory=lambda: dict(FAMILY_MIX))
    """The benchmark questions' family mix (`FAMILY_MIX`)."""


# ----------------------------------------------------------------------------------------- data
class Conversations(Dataset):
    """Training conversation ``i``: item ``i`` of the stream ``seed`` (family drawn from ``families``)
    in a task drawn from ``tasks``, one task per ``group`` consecutive items: with ``group`` = the
    batch size a batch holds one route's lengths (a DINO row is ~2x longer than the others,
    and padding every batch to it doubled the step time). The vision stage's tasks give a `View`
    (an image and its token labels, no text)."""

    def __init__(self, tokenizer, seed: int, length: int, max_pixels: int | None = None, group: int = 1,
                 tasks: dict[str, float] = TASKS, branch: str = "dino", clip_max_pixels: int | None = None,
                 families: dict[str, float] = FAMILY_MIX):
        self.tokenizer, self.seed, self.length, self.max_pixels, self.group = tokenizer, seed, length, max_pixels, group
        self.tasks, self.branch, self.clip_max_pixels, self.families = tasks, branch, clip_max_pixels, families

    def __len__(self) -> int:
        return self.length

    def task(self, index: int) -> tuple[Family, str]:
        """(question family, task) of conversation ``index``, independent of the item's own stream."""
        rng = np.random.default_rng([self.seed, index, 1])
        family = str(rng.choice(list(self.families), p=list(self.families.values())))
        rng = np.random.default_rng([self.seed, index // self.group, 2])
        return family, str(rng.choice(list(self.tasks), p=list(self.tasks.values())))

    def __getitem__(self, index: int) -> Example | View:
        family, task = self.task(index)
        if task == "block_view":
            return block_view(self.seed, index, self.max_pixels)
        if task == "read_block":
            return block_reading_example(self.seed, index, self.tokenizer, max_pixels=self.max_pixels)
        item = make_item(self.seed, index, ("fine_detail",) if task == "read" else (family,))
        if task == "global_view":
            return labelled_view(item.image, item.objects, (0, 0, *item.size), self.max_pixels)
        if task == "ground":
            return grounding_example(item, self.tokenizer, max_pixels=self.max_pixels)
        if task == "read":
            return reading_example(item, self.tokenizer, max_pixels=self.max_pixels)
        return build_example(item, task, self.tokenizer, max_pixels=self.max_pixels, branch=self.branch,
                             clip_max_pixels=self.clip_max_pixels)


def collate(examples: list[Example] | list[View], model: VPTForConditionalGeneration) -> dict[str, torch.Tensor]:
    """Right-padded batch with M-RoPE `position_ids` (3, B, L); `model` (on the CPU) only numbers them
    (`View`s, a vision-stage batch: `collate_views`).

    Image inputs travel as float16, which halves what workers hand to the training process.
    """
    if isinstance(examples[0], View):
        return collate_views(examples)
    detection = [e.detection_images for e in examples if e.detection_images is not None]
    clip = [e.clip for e in examples if e.clip is not None]
    return {
        **padded_batch(examples, model, model.config.text_config.pad_token_id),
        **collate_views(examples),
        "detection_images": torch.cat(detection).half() if detection else None,
        **(_clip_inputs(clip) if clip else {}),
        "focus": torch.cat([torch.cat([torch.full((len(e.focus), 1), row), e.focus], 1)
                            for row, e in enumerate(examples)]),
    }


def _clip_inputs(views: list[View]) -> dict[str, torch.Tensor]:
    """The forward's clip branch inputs of a batch's re-encodings, and their token labels."""
    batch = collate_views(views)
    return {"clip_pixel_values": batch["pixel_values"], "clip_images_grid_thw": batch["image_grid_thw"],
            "clip_token_labels": batch["token_labels"]}


def collate_views(examples: list[Example | View]) -> dict[str, torch.Tensor]:
    """The images and token labels of ``examples`` (the text of an `Example` unused): a vision
    stage batch."""
    return {"pixel_values": torch.cat([e.pixel_values for e in examples]).half(),
            "image_grid_thw": torch.cat([e.image_grid_thw for e in examples]),
            "token_labels": torch.cat([e.token_labels for e in examples])}


# ----------------------------------------------------------------------------------------- eval
@torch.no_grad()
def answer_in_session(model, tokenizer, items: list[Item], mode: PromptMode) -> tuple[list[str], list[bool]]:
    """Greedy answers through `VPTSession` with at most one perception round, as the graph runs it
    (direct mode: the action start tokens suppressed); also whether each crop holds the item's box
    (False without a crop)."""
    device = next(model.parameters()).device
    images = [item.image.to(device) for item in items]
    suppress = tokenizer.convert_tokens_to_ids(list(ACTION_STARTS)) if mode == "direct" else ()
    session = VPTSession(model, tokenizer, suppress=suppress)
    session.start(images, [build_question(item.question, mode) for item in items])
    first = session.generate(24)
    final, hits = dict(first), [False] * len(items)
    for row, (item, image) in enumerate(zip(items, images)):
        parsed = parse_actions(first[row].text, item.size, allowed_branches=set(model.config.branches))
        if parsed.kind == "region":
            boxes = [region.box for region in parsed.regions]
            hits[row] = item.box is not None and any(_contains(box, item.box) for box in boxes)
            session.add_regions(row, crops(image, boxes))
        elif parsed.kind == "reencode" and (spec := parsed.reencode.spec).action_start + spec.action in first[row].text:
            session.add_reencode(row, spec.name, branch_features(model, spec.name, [image])[0])
        else:
            session.finish(row)
    final.update(session.generate(8))
    return [tokenizer.decode(final[row].token_ids, skip_special_tokens=True).strip() for row in range(len(items))], hits


def evaluate(model, tokenizer, items: list[Item], modes: tuple[PromptMode, ...] = ("region", "direct")) -> dict:
    """Accuracy per mode and family (exact answer match), and how often region mode's crop holds the target."""
    was_training = model.training
    model.eval()
    result: dict = {}
    for mode in modes:
        answers, hits = answer_in_session(model, tokenizer, items, mode)
        for family in sorted({item.family for item in items}):
            rows = [i for i, item in enumerate(items) if item.family == family]
            result[f"{mode}/{family}"] = sum(answers[i] == items[i].answer for i in rows) / len(rows)
            if mode == "region" and family == "fine_detail":
                result["region/fine_detail_crop_hit"] = sum(hits[i] for i in rows) / len(rows)
    model.train(was_training)
    return result


def _contains(outer, inner) -> bool:
    return outer[0] <= inner[0] and outer[1] <= inner[1] and outer[2] >= inner[2] and outer[3] >= inner[3]


# ---------------------------------------------------------------------------------------- train
def lr_at(step: int, progress: float, args: TrainArgs) -> float:
    """Linear warmup over `args.warmup` steps (``step`` counts from the last fresh optimizer moments),
    then cosine from `args.lr` to 10 % over `progress` 0..1."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


class TokenHead(torch.nn.Module):
    """Training only (saved in train_state.pt, not in the bundle): a linear classifier of every
    merged image token's `token_labels.COLUMNS`, so the ViT learns where each token lies and what
    object and glyph it shows, which the LLM's loss alone does not teach it."""

    def __init__(self, hidden: int) -> None:
        super().__init__()
        self.linear = torch.nn.Linear(hidden, sum(COLUMNS.values()))
        name_weight = torch.ones(COLUMNS["name"])
        name_weight[0] = 0.1  # most tokens hold no object
        self.register_buffer("name_weight", name_weight, persistent=False)

    def forward(self, features: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        """Loss and accuracy per label column (columns without labels in the batch left out)."""
        result = {}
        columns = self.linear(features).float().split(list(COLUMNS.values()), -1)
        for k, (column, logits) in enumerate(zip(COLUMNS, columns)):
            target, weight = labels[:, k], self.name_weight if column == "name" else None
            if (known := target != IGNORE).any():
                result[column] = torch.nn.functional.cross_entropy(logits, target, weight=weight, ignore_index=IGNORE)
                hit = logits.argmax(-1) == target
                result[f"{column}_acc"] = (hit[known & (target > 0)] if column == "name" else hit[known]).float().mean()
        return result


def train_step(model, head: TokenHead, batch: dict[str, torch.Tensor | None], optimizer,
               vision_weight: float = 1.0, focus_weight: float = 1.0) -> dict[str, torch.Tensor]:
    """One optimizer step on a collated batch: the LLM's loss, plus ``vision_weight`` times
    ``head``'s on the merger's output, plus ``focus_weight`` times `focus_loss` (needs eager
    attention); bf16 autocast (1.5x faster on a 2-core AVX512-BF16 CPU too). Returns the detached
    losses and the head's accuracies."""
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) if v is not None else None for k, v in batch.items()}
    token_labels, focus = batch.pop("token_labels"), batch.pop("focus")
    clip_labels = batch.pop("clip_token_labels", None)
    merged: list[torch.Tensor] = []
    attention: list[torch.Tensor] = []
    layers = model.model.language_model.layers  # the middle one: those before gather the question's words
    hooks = [model.model.visual.merger.register_forward_hook(lambda module, args, output: merged.append(output)),
             layers[len(layers) // 2].self_attn.register_forward_hook(
                 lambda module, args, output: attention.append(output[1]))]
    try:
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = model(**batch, use_cache=False).loss
            # the merger ran on the images, then (re-encoding rows) on the clip branch's views
            if clip_labels is not None:
                token_labels = torch.cat([token_labels, clip_labels])
            vision = head(torch.cat(merged), token_labels)
    finally:
        for hook in hooks:
            hook.remove()
    focused = focus_loss(attention[-1], focus)  # the last call: the full pass (pass 1 ends at an action start)
    _update(loss + focus_weight * focused + vision_weight * _losses(vision), model, head, optimizer)
    return {"loss": loss.detach(), "focus": focused.detach(), **{k: v.detach() for k, v in vision.items()}}


def vision_step(model, head: TokenHead, batch: dict[str, torch.Tensor], optimizer) -> dict[str, torch.Tensor]:
    """One optimizer step of the vision stage on a `collate_views` batch: `head`'s loss on the
    merger's output alone; returns its detached losses and accuracies."""
    device = next(model.parameters()).device
    batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
    with torch.autocast(device.type, dtype=torch.bfloat16):
        features = model.model.get_image_features(batch["pixel_values"], batch["image_grid_thw"]).pooler_output
        vision = head(torch.cat(features), batch["token_labels"])
    _update(_losses(vision), model, head, optimizer)
    return {k: v.detach() for k, v in vision.items()}


def _losses(head_result: dict[str, torch.Tensor]) -> torch.Tensor:
    return sum(v for k, v in head_result.items() if not k.endswith("_acc"))


def _update(loss: torch.Tensor, model, head: TokenHead, optimizer) -> None:
    loss.backward()
    torch.nn.utils.clip_grad_norm_([*model.parameters(), *head.parameters()], 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def focus_loss(weights: torch.Tensor | None, focus: torch.Tensor) -> torch.Tensor:
    """Mean over the (row, query, head) triples of ``focus`` ((n, 4): row, query, key, head) of
    -log(the attention that the head of ``weights`` (B, heads, L, L) gives their keys): trains a
    few heads of the LLM to find the objects a token is about, a lookup the LLM's loss alone
    teaches only after ~1e5 examples (tools/probe_grounding.py, --attention-loss)."""
    if weights is None:
        raise RuntimeError("the focus loss needs attention weights: model.set_attn_implementation('eager')")
    if not len(focus):
        return weights.new_zeros(())
    rows, queries, keys, heads = focus.unbind(1)
    on_keys = torch.zeros(weights.shape[:3], device=weights.device)
    on_keys = on_keys.index_put((rows, heads, queries), weights[rows, heads, queries, keys].float(), accumulate=True)
    rows, queries, heads = torch.unique(focus[:, [0, 1, 3]], dim=0).unbind(1)
    return -on_keys[rows, heads, queries].clamp_min(1e-6).log().mean()


def save(out: Path, model, tokenizer, head: TokenHead, optimizer, step: int, elapsed: float) -> None:
    """The bundle (model.safetensors, config.json, tokenizer) plus, for --resume, train_state.pt
    (`TokenHead`, step, time) and optimizer.pt."""
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    torch.save({"head": head.state_dict(), "step": step, "elapsed": elapsed}, out / TRAIN_STATE)
    torch.save(optimizer.state_dict(), out / OPTIMIZER_STATE)


def load_or_init(args: TrainArgs) -> tuple[VPTForConditionalGeneration, object, TokenHead, dict]:
    """(model and head on the CPU, tokenizer, train state) from `args.resume`, or a new demo model."""
    if args.resume:
        # map_location: a checkpoint saved on a GPU resumes on a CPU too
        state = torch.load(args.resume / TRAIN_STATE, map_location="cpu", weights_only=True)
        if (args.resume / OPTIMIZER_STATE).is_file():
            state["optimizer"] = torch.load(args.resume / OPTIMIZER_STATE, map_location="cpu", weights_only=True)
        model = VPTForConditionalGeneration.from_pretrained(args.resume)
        head = TokenHead(model.config.text_config.hidden_size)
        head.load_state_dict(state["head"])
        return model, load_tokenizer(args.resume), head, state
    if args.init:
        base = VPTForConditionalGeneration.from_pretrained(args.init)
        config = VPTConfig(**{**base.config.to_dict(), **args.config_overrides})
        model = VPTForConditionalGeneration(config)
        if unexpected := model.load_state_dict(base.state_dict(), strict=False).unexpected_keys:
            raise ValueError(f"{args.init} holds weights the changed config has no place for: {unexpected[:5]}")
        head = TokenHead(config.text_config.hidden_size)
        head.load_state_dict(torch.load(args.init / TRAIN_STATE, map_location="cpu", weights_only=True)["head"])
        return model, load_tokenizer(args.init), head, {"step": 0, "elapsed": 0.0}
    tokenizer = demo_tokenizer()
    model = VPTForConditionalGeneration(demo_config(tokenizer, **args.config_overrides))
    return model, tokenizer, TokenHead(model.config.text_config.hidden_size), {"step": 0, "elapsed": 0.0}


def train(args: TrainArgs) -> dict:
    """Train (or resume) and save to `args.out`; returns the final evaluation. `args.minutes` bounds
    the training time of all runs of this checkpoint together."""
    torch.manual_seed(args.seed)
    torch.backends.cuda.matmul.allow_tf32 = True
    device = torch.device(args.device)
    model, tokenizer, head, state = load_or_init(args)
    start = step = state["step"]
    # fresh moments, or a run with its own schedule: warm up again
    warm_from = 0 if "optimizer" in state and not args.run_minutes else start

    branch = reencode_branch(model.config)

    def stage(tasks: dict[str, float], collate_fn, first: int, last: int) -> DataLoader:
        return DataLoader(
            Conversations(tokenizer, args.seed, args.steps * args.batch_size, model.config.image_max_pixels,
                          group=args.batch_size, tasks=tasks, branch=branch,
                          clip_max_pixels=model.config.reencode_max_pixels, families=args.families),
            batch_size=args.batch_size,
            sampler=range(first * args.batch_size, last * args.batch_size),
            collate_fn=collate_fn,
            num_workers=args.workers,
            prefetch_factor=2 if args.workers else None,
            pin_memory=device.type == "cuda",
        )

    vision_end = min(args.vision_steps, args.steps)
    # each stage's workers start when its first batch is asked for (a conversation stage's hold a
    # CPU copy of the model to number positions)
    batches = chain.from_iterable([
        stage(VISION_TASKS, collate_views, min(start, vision_end), vision_end),
        stage(args.tasks, partial(collate, model=model), max(start, vision_end), args.steps),
    ])
    model.to(device).train()
    model.set_attn_implementation("eager")  # the focus loss reads attention weights
    head.to(device)
    optimizer = torch.optim.AdamW([*model.parameters(), *head.parameters()], lr=args.lr, betas=(0.9, 0.95),
                                  weight_decay=args.weight_decay, fused=device.type == "cuda")
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    eval_items = [make_item(args.seed + 1, i, ("fine_detail",)) for i in range(args.eval_items)]
    args.out.mkdir(parents=True, exist_ok=True)
    log = (args.out / "log.jsonl").open("a")
    budget = args.minutes * 60 if args.minutes else math.inf
    run_budget = args.run_minutes * 60 if args.run_minutes else math.inf
    t0 = time.perf_counter()

    def run_time() -> float:
        return time.perf_counter() - t0

    def elapsed() -> float:
        return state["elapsed"] + run_time()

    def progress() -> float:  # through the cosine
        return run_time() / run_budget if args.run_minutes else max(step / args.steps, elapsed() / budget)

    def fresh() -> dict:  # what the next log line averages over
        return {"t": time.perf_counter(), "wait": 0.0, "steps": 0, "sums": {}, "counts": {}}

    window = fresh()
    bar = tqdm(total=args.steps, initial=step, mininterval=5, dynamic_ncols=True)
    while step < args.steps and elapsed() < budget and run_time() < run_budget:
        lr = lr_at(step - warm_from, progress(), args)
        for group in optimizer.param_groups:
            group["lr"] = lr
        t_wait = time.perf_counter()
        batch = next(batches)
        window["wait"] += time.perf_counter() - t_wait
        if "input_ids" in batch:
            result = train_step(model, head, batch, optimizer, args.vision_weight, args.focus_weight)
        else:
            result = vision_step(model, head, batch, optimizer)
        for key, value in result.items():
            window["sums"][key] = window["sums"].get(key, 0) + value
            window["counts"][key] = window["counts"].get(key, 0) + 1
        window["steps"] += 1
        step += 1
        bar.update()
        if step % args.log_every == 0:
            seconds, n = time.perf_counter() - window["t"], window["steps"]
            means = {f"{k}_loss" if k in COLUMNS else k: round(v.item() / window["counts"][k], 4)
                     for k, v in window["sums"].items()}
            record = {"step": step, **means, "lr": lr, "items_per_s": n * args.batch_size / seconds,
                      "data_wait": window["wait"] / seconds, "elapsed_s": elapsed()}
            window = fresh()
            log.write(json.dumps(record) + "\n")
            log.flush()
            shown = {k: f"{record[k]:.3f}" for k in ("loss", "focus", "glyph_acc") if k in record}
            bar.set_postfix(**shown, items_s=f"{record['items_per_s']:.0f}", wait=f"{record['data_wait']:.0%}")
            if step - start == 3 * args.log_every:  # past the workers' start-up: what to extrapolate from
                tqdm.write(f"throughput: {record['items_per_s']:.0f} items/s ({seconds / n:.3f} s/step), "
                           f"data wait {record['data_wait']:.0%}")
        if args.eval_every and step % args.eval_every == 0:
            result = evaluate(model, tokenizer, eval_items, PERIODIC_MODES[branch])
            tqdm.write(f"step {step}: " + ", ".join(f"{k} {v:.2f}" for k, v in result.items()))
            log.write(json.dumps({"step": step, "eval": result}) + "\n")
            save(args.out, model, tokenizer, head, optimizer, step, elapsed())
            window = fresh()  # throughput counts training only
    bar.close()
    save(args.out, model, tokenizer, head, optimizer, step, elapsed())
    final_items = [make_item(args.seed + 1, i, (family,)) for family in FAMILIES for i in range(args.eval_items)]
    result = evaluate(model, tokenizer, final_items, ("region", "free", "reencode", "direct"))
    log.write(json.dumps({"step": step, "final_eval": result, "args": asdict(args)}, default=str) + "\n")
    log.close()
    return result
