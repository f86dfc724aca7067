"""Supervised fine-tuning of a VPT checkpoint on VPT_Datasets files with transformers' `Trainer`:
LoRA (peft) or full fine-tuning, saved in the layout `build_graph` loads. A plain Qwen2-VL / Qwen2.5-VL
base is first made a VPT model with one branch (`vpt_agent.model.from_base`).

What trains: LoRA adapters on the LLM's linear layers (merged into the base on save by default),
or every LLM weight (embeddings and head included); in both, the VPT projectors are trained in
full. Or the projectors alone, on the re-encoding conversations (the paper's alignment stage). The ViT (merger included) and the DINOv2 / SAM encoders stay frozen, as LLaMA-Factory's
defaults freeze the vision tower and the multimodal projector. The loss is the token mean over the
global batch (every rank and accumulation step together), so N processes give 1 process's losses.
"""
from __future__ import annotations

import contextlib
import json
import sys
from dataclasses import asdict
from pathlib import Path

import torch

from ..errors import ConfigError
from ..graph import load_model
from ..model.from_base import is_plain_base, vpt_from_base
from ..model.modeling import next_token_targets
from ..tokens import BRANCHES
from .data import Collator, SFTDataset, read_sft_items, supervised_positions
from .options import SFTOptions

LLM_LINEAR = r".*language_model\.layers\.\d+\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
"""The LLM's linear layers: LoRA's targets."""
FROZEN = ("model.visual.", "detection_model.", "seg_model.")
"""Parameter prefixes never trained: the ViT with its merger, the DINOv2 and SAM encoders."""
DEFAULT_LR = {"lora": 1e-4, "full": 1e-5, "projectors": 1e-3}
"""Peak learning rate by method when `SFTOptions.lr` is unset."""
PLAIN_BRANCH = "clip"
"""A plain base's branch without --branch: the model's own ViT, which needs no other weights."""
LOG = "train_log.jsonl"
"""Written to the output folder: one line per logged step (loss, learning rate, ...)."""


def train(options: SFTOptions) -> Path:
    """Fine-tune ``options.base`` on ``options.data``, checkpointing to ``options.out`` (resumed from the
    last checkpoint there with ``options.resume``), and save the result there; returns ``options.out``."""
    from transformers import Trainer, TrainingArguments, set_seed

    options.check()
    out = Path(options.out)
    last = last_checkpoint(out)
    if options.resume and last is None:
        raise ConfigError(f"--resume: no checkpoint-* folder in {out} to resume from")
    if last is not None and not options.resume:
        raise ConfigError(f"{out} holds checkpoints of an earlier run: --resume continues it, or choose another --out")
    set_seed(options.seed)
    plain = is_plain_base(options.base)
    model, tokenizer = _from_base(options) if plain else _from_vpt(options)
    items = read_sft_items(options.data, model.config.branches, options.branch or (PLAIN_BRANCH if plain else None))
    if options.method == "projectors":  # the projectors see only re-encoding turns
        items = [item for item in items if any(r.kind == "reencode" for r in item.rounds)]
        if not items:
            raise ConfigError("--projectors trains on re-encoding conversations; the --data files hold none")
    dataset = SFTDataset(items, tokenizer, model.image_processor, model.config)
    collator = Collator(model, model.config.text_config.pad_token_id)
    trained = _trainable(model, options, new_tokens=plain)
    args = TrainingArguments(
        output_dir=str(out),
        max_steps=options.max_steps,
        per_device_train_batch_size=options.batch_size,
        gradient_accumulation_steps=options.grad_accum,
        learning_rate=options.lr if options.lr is not None else DEFAULT_LR[options.method],
        lr_scheduler_type="cosine",
        warmup_steps=options.warmup_steps,
        weight_decay=options.weight_decay,
        max_grad_norm=options.max_grad_norm,
        bf16=options.bf16,
        use_cpu=not torch.cuda.is_available(),  # so that torchrun on CPUs runs DDP over gloo
        activation_checkpointing=options.gradient_checkpointing,
        activation_checkpointing_kwargs={"use_reentrant": False},
        logging_steps=options.logging_steps,
        save_steps=options.save_steps,
        save_total_limit=options.save_total_limit,
        report_to=options.report_to,
        seed=options.seed,
        data_seed=options.seed,
        remove_unused_columns=False,  # the collator's batch is the forward's keyword arguments
        dataloader_num_workers=options.workers,
        dataloader_pin_memory=torch.cuda.is_available(),
        ddp_find_unused_parameters=True,  # a batch without a branch's turn leaves its projector unused
        disable_tqdm=not options.progress,
    )
    trainer = Trainer(model=trained, args=args, train_dataset=dataset, data_collator=collator,
                      processing_class=tokenizer, compute_loss_func=token_mean_loss)
    with contextlib.redirect_stdout(sys.stderr):  # the progress bar's loss lines: stdout is the result's path
        trainer.train(resume_from_checkpoint=last)
    if trainer.is_world_process_zero():
        _save(trainer.model, tokenizer, out, options)
        with (out / LOG).open("w") as log:
            for record in trainer.state.log_history:
                log.write(json.dumps(record) + "\n")
    trainer.accelerator.wait_for_everyone()
    return out


def _from_vpt(options: SFTOptions):
    """(model, tokenizer) of the VPT checkpoint ``options.base``, in float32 on the CPU (Trainer places it)."""
    if options.dino or options.sam:
        raise ConfigError(f"--dino / --sam give a plain base its encoders; {options.base} is a VPT checkpoint")
    return load_model(options.base, device="cpu", dtype=torch.float32)


def _from_base(options: SFTOptions):
    """(model, tokenizer): the plain checkpoint ``options.base`` made a VPT model with ``options.branch``
    (default clip) and its encoder's weights, in float32 on the CPU."""
    configs = {"dino": options.dino_config, "sam": options.sam_config}
    return vpt_from_base(options.base, [options.branch or PLAIN_BRANCH], {"dino": options.dino, "sam": options.sam},
                         {branch: config for branch, config in configs.items() if config}, dtype=torch.float32)


def last_checkpoint(out: Path) -> str | None:
    """The last complete ``checkpoint-N`` folder in ``out``: `Trainer` writes its ``trainer_state.json``
    last, so a run killed while saving leaves a folder without a readable one, which is passed over."""
    steps = []
    for folder in out.glob("checkpoint-*"):
        try:
            json.loads((folder / "trainer_state.json").read_text())
            steps.append(int(folder.name.removeprefix("checkpoint-")))
        except (OSError, ValueError):
            continue
    return str(out / f"checkpoint-{max(steps)}") if steps else None


def token_mean_loss(outputs, labels: torch.Tensor, num_items_in_batch: torch.Tensor | int | None = None) -> torch.Tensor:
    """Next-token cross-entropy summed over the supervised tokens, divided by the number of supervised
    tokens in the whole global batch (``num_items_in_batch``; the batch's own without it). ``outputs``
    holds the logits of every position, or of the collator's ``logits_to_keep`` alone."""
    if outputs.logits.shape[1] == labels.shape[1]:
        logits, targets = outputs.logits[:, :-1], labels[:, 1:]
    else:
        logits, targets = outputs.logits, next_token_targets(labels, supervised_positions(labels))
    logits, targets = logits.float(), targets.to(logits.device)
    total = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100,
                                              reduction="sum")
    count = num_items_in_batch if num_items_in_batch is not None else (targets != -100).sum()
    return total / count


def _trainable(model, options: SFTOptions, new_tokens: bool = False):
    """The model to train: ``model`` with only its trained parameters requiring gradients, or its
    peft LoRA wrapper (which, with ``new_tokens``, trains the embedding and head in full too: their
    new rows start alike)."""
    projectors = [f"{BRANCHES[b].prefix}_projector" for b in model.config.branches]
    if options.method == "lora":
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=options.lora_rank, lora_alpha=options.lora_alpha, lora_dropout=options.lora_dropout,
                            target_modules=LLM_LINEAR,
                            modules_to_save=projectors + (["embed_tokens", "lm_head"] if new_tokens else []),
                            ensure_weight_tying=model.config.tie_word_embeddings)
        return get_peft_model(model, config)
    for name, param in model.named_parameters():  # "projectors": the paper's alignment stage
        param.requires_grad_(name.startswith(tuple(projectors)) if options.method == "projectors"
                             else not name.startswith(FROZEN))
    return model


def _save(model, tokenizer, out: Path, options: SFTOptions) -> None:
    """The trained model in the layout `build_graph` loads (or the peft adapter alone), its tokenizer
    and the options it was trained with."""
    if options.method == "lora" and options.merge_lora:
        model = model.merge_and_unload()
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    (out / "sft_options.json").write_text(json.dumps(asdict(options), indent=1) + "\n")
