"""A VPT model from a plain Qwen2-VL / Qwen2.5-VL checkpoint (transformers' own save, e.g.
Qwen2-VL-2B-Instruct): the VPT tokens added to its tokenizer, the VPT fields to its config, the
embedding rows of the new ids set to the mean of the existing rows (the head's too), the branch
encoders' weights read from their own files and the projectors initialised as the model's
constructor does. The base's weights load as a VPT checkpoint's do, nothing of them re-initialised."""
from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..perception.dino import check_converted, convert_hf_dinov2_state_dict, convert_timm_dinov2_state_dict
from ..perception.sam import convert_hf_sam_vision_state_dict
from ..tokens import BRANCHES, CONFIG_TOKEN_FIELDS
from .config import REQUIRED_ID_FIELDS, VPTFields
from .loading import (
    convert_state_dict,
    load_config,
    load_image_processor,
    read_state_dict,
    read_weight_file,
    resolve_checkpoint_dir,
)
from .modeling import VPTMixin, meta_model
from .tokenizer import add_vpt_tokens, special_ids

ENCODERS = {"dino": ("detection_model", "detection_encoder_config"), "sam": ("seg_model", "seg_encoder_config")}
"""Branch with its own encoder -> (the model's module, the config field of its architecture)."""
EMBEDDINGS = ("model.language_model.embed_tokens.weight", "lm_head.weight")
"""The rows indexed by token id: the input embedding and the (untied) head."""


def is_plain_base(path: str | Path) -> bool:
    """Whether the checkpoint at `path` is a plain base: its config.json has none of the VPT token-id
    fields (an unreadable one is left to the VPT loader to report)."""
    try:
        raw = json.loads((resolve_checkpoint_dir(path) / "config.json").read_text())
    except (OSError, ValueError, CheckpointError):
        return False
    return isinstance(raw, dict) and all(raw.get(field) is None for field in REQUIRED_ID_FIELDS[3:])


def vpt_from_base(base: str | Path, branches: Sequence[str] = ("clip",), encoders: Mapping[str, str | Path] = {},
                  encoder_configs: Mapping[str, dict[str, Any]] = {}, dtype: torch.dtype | None = None
                  ) -> tuple[VPTMixin, Any]:
    """(model, tokenizer): the VPT model with `branches` on the plain checkpoint `base`, in eval mode on
    the CPU in `dtype` (default: the files'). `encoders` names the weight file of each dino / sam branch,
    `encoder_configs` its architecture (a `Dinov2Config` / `SamVisionConfig` dict; default the released
    DINOv2-L / SAM-L)."""
    from transformers import AutoTokenizer

    path = resolve_checkpoint_dir(base)
    tokenizer = AutoTokenizer.from_pretrained(path)
    known = len(tokenizer)
    add_vpt_tokens(tokenizer)
    config = _vpt_config(path, tokenizer, branches, encoder_configs)
    model = meta_model(config)
    state = _with_new_rows(convert_state_dict(read_state_dict(path), model), known, config.text_config.vocab_size)
    for branch in branches:
        if branch in ENCODERS:
            state.update(_encoder_weights(model, branch, encoders.get(branch)))
        state.update(_fresh_weights(model, f"{BRANCHES[branch].prefix}_projector"))
    model.load_weights(state, dtype=dtype)
    model.image_processor = load_image_processor(path, config)
    return model.eval(), tokenizer


def _vpt_config(path: Path, tokenizer, branches: Sequence[str], encoder_configs: Mapping[str, dict]) -> VPTFields:
    """The base's config.json plus the VPT fields: the token ids of `tokenizer`, `branches` and their
    encoders' architectures; the vocabulary grown to the tokenizer where it does not cover it."""
    ids = special_ids(tokenizer)
    overrides = {field: ids[field] for field in CONFIG_TOKEN_FIELDS}
    overrides.update({ENCODERS[b][1]: dict(encoder_configs[b]) for b in branches if b in encoder_configs})
    config = load_config(path, vision_encoder_ls=list(branches), **overrides)
    text = config.text_config  # the base's nested text config: flat overrides would not reach it
    text.vocab_size = max(text.vocab_size, len(tokenizer))
    if text.pad_token_id is None:
        text.pad_token_id = ids["pad_token_id"]
    return config


def _with_new_rows(state: dict[str, torch.Tensor], known: int, vocab_size: int) -> dict[str, torch.Tensor]:
    """`state` with its embedding (and head) rows from id `known` on set to the mean of the rows below
    it, grown to `vocab_size` rows: new tokens start as the average known token."""
    out = dict(state)
    for key in EMBEDDINGS:
        if key in state:
            rows = state[key]
            mean = rows[:known].float().mean(0, keepdim=True).to(rows.dtype)
            out[key] = torch.cat([rows[:known], mean.expand(vocab_size - known, -1)])
    return out


def _encoder_weights(model: VPTMixin, branch: str, file: str | Path | None) -> dict[str, torch.Tensor]:
    """The weights of `branch`'s encoder read from `file`, under the model's names; a one-line
    `CheckpointError` naming the file and the keys that do not fit."""
    if file is None:
        raise ConfigError(f"--branch {branch} on a plain base needs its encoder's weights: --{branch} FILE")
    file = Path(file)
    if not file.is_file():
        raise CheckpointError(f"--{branch}: no such file: {file}")
    attr = ENCODERS[branch][0]
    module = getattr(model, attr)
    try:
        weights = _convert_encoder(branch, read_weight_file(file), module)
    except CheckpointError as exc:
        raise CheckpointError(f"--{branch} {file}: {exc}") from None
    return {f"{attr}.{key}": value for key, value in weights.items()}


def _convert_encoder(branch: str, state: dict[str, torch.Tensor], module: nn.Module) -> dict[str, torch.Tensor]:
    """An encoder file's tensors in `module`'s names. DINOv2: transformers' `Dinov2Model` names, else
    timm's / the original release's. SAM: segment-anything's checkpoint (its ``image_encoder.``),
    transformers' `SamModel` (its ``vision_encoder.``) or an encoder alone in either naming."""
    if branch == "dino":
        hf = any(key.startswith("embeddings.") for key in state)
        return (convert_hf_dinov2_state_dict if hf else convert_timm_dinov2_state_dict)(state, module)
    for prefix in ("image_encoder.", "vision_encoder."):
        if any(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items() if key.startswith(prefix)}
    if set(state) <= set(module.state_dict()):
        return check_converted(state, module)
    return convert_hf_sam_vision_state_dict(state, module)


def _fresh_weights(model: VPTMixin, attr: str) -> dict[str, torch.Tensor]:
    """The weights of the meta module `attr`, initialised on the CPU as its constructor does (each
    layer's own `reset_parameters`: torch's default init)."""
    module = getattr(model, attr).to_empty(device="cpu")
    for layer in module.modules():
        if hasattr(layer, "reset_parameters"):
            layer.reset_parameters()
    return {f"{attr}.{key}": value for key, value in module.state_dict().items()}
