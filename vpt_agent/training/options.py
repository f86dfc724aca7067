"""The options of a training run (no heavy imports: the CLI checks them before torch loads)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from ..errors import ConfigError
from ..tokens import BRANCHES


@dataclass
class SFTOptions:
    """One training run (the command's options; a --config file sets the same names)."""

    base: str
    """A VPT checkpoint, or a plain Qwen2-VL / Qwen2.5-VL one (made a VPT model with the ``branch``)."""
    data: list[str]
    out: str
    branch: str | None = None
    """Train every re-encoding turn as this branch's (default: the branch each turn names; on a plain
    base, clip)."""
    dino: str | None = None
    """A plain base's DINOv2 weights (``--branch dino``): a safetensors file or a tensor pickle."""
    sam: str | None = None
    """A plain base's SAM weights (``--branch sam``): segment-anything's checkpoint or a safetensors file."""
    dino_config: dict | None = None
    """The architecture of ``dino`` (a ``Dinov2Config`` dict; default the released DINOv2-L)."""
    sam_config: dict | None = None
    """The architecture of ``sam`` (a ``SamVisionConfig`` dict; default the released SAM ViT-L)."""
    method: Literal["lora", "full", "projectors"] = "lora"
    """LoRA on the LLM (+ the projectors), the whole LLM (+ the projectors), or the VPT projectors
    alone (the paper's alignment stage, before training the whole model)."""
    max_steps: int = 1000
    batch_size: int = 1
    """Conversations per process and step."""
    grad_accum: int = 1
    lr: float | None = None
    """Default 1e-4 for LoRA, 1e-5 for full fine-tuning, 1e-3 for the projectors alone."""
    warmup_steps: int = 0
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    lora_rank: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    merge_lora: bool = True
    """Merge the adapters into the base when saving (else save the peft adapter alone)."""
    bf16: bool = False
    gradient_checkpointing: bool = False
    save_steps: int = 500
    save_total_limit: int = 2
    logging_steps: int = 10
    report_to: list[str] = field(default_factory=lambda: ["none"])
    seed: int = 42
    resume: bool = False
    workers: int = 0
    """DataLoader worker processes (0: conversations are built in the training process)."""
    progress: bool = True
    """Trainer's progress bar (steps, elapsed, ETA) and logged losses on stderr, by the first process."""

    def check(self) -> None:
        """A `ConfigError` for values no run can use (before anything heavy loads)."""
        if self.method not in ("lora", "full", "projectors"):
            raise ConfigError(f"unknown method {self.method!r}; expected lora, full or projectors")
        if self.branch is not None and self.branch not in BRANCHES:
            raise ConfigError(f"unknown branch {self.branch!r}; expected one of {sorted(BRANCHES)}")
        if not self.data:
            raise ConfigError("give at least one --data file")
        for name in ("max_steps", "batch_size", "grad_accum", "save_steps", "logging_steps", "lora_rank"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be positive, got {getattr(self, name)}")
