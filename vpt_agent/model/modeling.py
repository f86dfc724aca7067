"""VPT models: Qwen2-VL (`VPTForConditionalGeneration`) or Qwen2.5-VL
(`VPTQwen2_5ForConditionalGeneration`) with Visual Perception Token branches.

Both are transformers' own class of their base plus `VPTMixin`, which holds all of the VPT logic;
`from_pretrained` on either builds the class the checkpoint's config names (`vpt_model_class`).

The model owns the branch encoders' weights (DINOv2 via timm, SAM via segment-anything, the
CLIP branch reuses the model's own ViT) and the conditioned projectors. Its `forward` is the
reference-compatible one (1 or 2 inner passes, DESIGN.md §2) and also the hook the
multi-round session uses: `injected_features` replace placeholder embeddings and
`action_conditions` replace the action tokens' input embeddings.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration
from transformers.cache_utils import Cache
from transformers.utils import ModelOutput

from ..errors import CheckpointError, ConfigError, InputMismatchError, MissingBranchError
from ..perception.dino import build_dino_encoder
from ..perception.sam import build_sam_encoder
from ..tokens import BRANCHES
from .config import VPTConfig, VPTFields, VPTQwen2_5Config
from .loading import (
    check_state_dict,
    convert_state_dict,
    image_processor_for,
    load_config,
    load_image_processor,
    read_state_dict,
    resolve_checkpoint_dir,
    resolve_device,
)
from .projectors import PROJECTORS, ConditionedProjector


@dataclass
class VPTOutput(ModelOutput):
    """Logits plus what the session needs: the final (post-norm) hidden states and the cache."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    last_hidden_state: torch.Tensor | None = None
    cache: Cache | None = None
    action_conditions: dict[str, torch.Tensor] | None = None


def next_token_targets(labels: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """(B, K) the labels the logits at (K,) sequence `positions` of (B, L) `labels` predict: position t's
    logits score token t + 1."""
    return labels[:, 1:][:, positions]


class VPTMixin:
    """The VPT part of a model, mixed in before transformers' class of its base (whose `model` holds
    the vision tower, `get_image_features`, `get_vision_position_ids`, `get_rope_index` and the
    `language_model`, and whose `lm_head` the logits come from). Branch modules follow the released
    names: `detection_model`, `detection_projector`, `seg_model`, `seg_projector`, `clip_projector`."""

    config: VPTFields

    def __init__(self, config: VPTFields) -> None:
        config.validate_vpt()
        super().__init__(config)
        self.image_processor = image_processor_for(config)
        """Qwen2-VL image processing, which Qwen2.5-VL shares (a checkpoint's own
        `preprocessor_config.json` once loaded)."""
        hidden = config.text_config.hidden_size
        for branch in config.branches:
            prefix = BRANCHES[branch].prefix
            if branch == "dino":
                self.detection_model = build_dino_encoder(config.detection_encoder_config)
                width = self.detection_model.embed_dim
            elif branch == "sam":
                self.seg_model = build_sam_encoder(config.seg_encoder_config)
                width = self.seg_model.neck[0].out_channels
            else:
                width = hidden
            setattr(self, f"{prefix}_projector", PROJECTORS[branch](width, hidden))

    def enable_input_require_grads(self) -> None:
        """Make the token embeddings' output require gradients (what activation checkpointing and
        adapters need), and nothing else: transformers' default also hooks every sub-model's input
        embeddings, the vision tower's patch embedding among them, which makes the frozen ViT run
        a backward (and, checkpointed, its forward twice) in every training step."""

        def require_grads(module, inputs, output) -> None:
            output.requires_grad_(True)

        self._require_grads_hooks = [self.get_input_embeddings().register_forward_hook(require_grads)]
        self._require_grads_hook = self._require_grads_hooks[0]  # the name transformers' disable_... also reads

    # ------------------------------------------------------------ load / save
    @classmethod
    def from_pretrained(
        cls,
        path_or_id: str | Path,
        *,
        torch_dtype: torch.dtype | None = None,
        dtype: torch.dtype | None = None,
        device_map: str | torch.device | None = None,
        config: VPTFields | None = None,
        **config_overrides: Any,
    ) -> VPTMixin:
        """Load a released VPT checkpoint (4.45 names, sharded .bin or safetensors) or our own save,
        as the VPT class of the base its config names (whichever VPT class this is called on).

        `config` (as the Auto classes pass it) is used as is; other keyword arguments override
        config fields, e.g.
        `detection_encoder_config=...` for a checkpoint with a non-default DINOv2.
        """
        path = resolve_checkpoint_dir(path_or_id)
        if config is None:  # the Auto classes pass the config they already read
            config = load_config(path, **config_overrides)
        model = meta_model(config)
        model.load_weights(convert_state_dict(read_state_dict(path), model), device_map, dtype or torch_dtype)
        model.image_processor = load_image_processor(path, config)
        return model.eval()

    def load_weights(self, state: dict[str, torch.Tensor], device_map: str | torch.device | None = None,
                     dtype: torch.dtype | None = None) -> None:
        """Give this `meta_model` every weight from `state` (this library's names; a `CheckpointError`
        for any missing, unexpected or mis-shaped one), as owned copies on `device_map` in `dtype`."""
        device = resolve_device(device_map)
        check_state_dict(state, self)
        state = {key: value.to(device, dtype if dtype and value.is_floating_point() else value.dtype, copy=True)
                 for key, value in state.items()}  # one owned copy each, in the target dtype
        self.load_state_dict(state, strict=False, assign=True)
        if self.config.tie_word_embeddings:
            self.tie_weights()
        _materialize_buffers(self, device)

    def save_pretrained(self, save_directory: str | Path, **_: Any) -> None:
        """Write `config.json`, `preprocessor_config.json` and `model.safetensors` (this library's key names)."""
        out = Path(save_directory)
        out.mkdir(parents=True, exist_ok=True)
        self.config.save_pretrained(out)
        self.image_processor.save_pretrained(out)
        state = {k: v.detach().contiguous() for k, v in self.state_dict().items()}
        if self.config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        save_file(state, out / "model.safetensors", metadata={"format": "pt"})

    # ----------------------------------------------------------------- branches
    def projector(self, branch: str) -> ConditionedProjector:
        """The conditioned projector of `branch`; `MissingBranchError` if the model lacks it."""
        if branch not in self.config.branches:
            raise MissingBranchError(
                f"this model has no '{branch}' branch (it has {list(self.config.branches)})"
            )
        return getattr(self, f"{BRANCHES[branch].prefix}_projector")

    def encode_branch(
        self, branch: str, images: torch.Tensor, grid_thw: torch.Tensor | None = None
    ) -> list[torch.Tensor]:
        """Raw encoder features of preprocessed images, one tensor per image.

        dino: (N,3,224,224) -> (256, d); sam: (N,3,1024,1024) -> (C,64,64);
        clip: Qwen2-VL pixel rows (P,1176) with `grid_thw` (N,3) -> (t*h*w/4, hidden).
        """
        self.projector(branch)  # raises if the branch is missing
        if branch == "dino":
            return list(self.detection_model(images))
        if branch == "sam":
            return list(self.seg_model(images))
        if grid_thw is None:
            raise InputMismatchError("the clip branch needs clip_images_grid_thw")
        return list(self.model.get_image_features(images, grid_thw).pooler_output)

    def project_branch(
        self, branch: str, features: list[torch.Tensor], conditions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Project per-image features (conditioned on one row of `conditions` each) -> (sum S, hidden)."""
        proj = self.projector(branch)
        if conditions is not None and len(conditions) != len(features):
            raise InputMismatchError(
                f"{branch}: {len(features)} encoder images but {len(conditions)} action tokens to condition them"
            )
        if branch == "clip":  # images of different sizes: one at a time
            outs = [
                proj(f[None], None if conditions is None else conditions[i : i + 1])[0]
                for i, f in enumerate(features)
            ]
            return torch.cat(outs)
        return proj(torch.stack(features), conditions).flatten(0, 1)

    # ------------------------------------------------------------------ forward
    def embed(
        self,
        input_ids: torch.LongTensor,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with the vision tower's image features scattered into `<|image_pad|>` rows."""
        embeds = self.model.get_input_embeddings()(input_ids)
        if pixel_values is not None:
            feats = torch.cat(self.model.get_image_features(pixel_values, image_grid_thw).pooler_output)
            embeds = _scatter(embeds, input_ids == self.config.image_token_id, feats, "<|image_pad|>")
        return embeds

    def token_embeds(self, input_ids: torch.LongTensor, conditions: dict[str, torch.Tensor]) -> torch.Tensor:
        """Embeddings of generated tokens (decode steps): an action token's is its conditioning vector."""
        actions = {b: input_ids == getattr(self.config, BRANCHES[b].action_field) for b in conditions}
        return _conditioned(self.embed(input_ids), actions, conditions)

    def forward(
        self,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | dict | None = None,
        position_ids: torch.LongTensor | None = None,
        cache: Cache | None = None,
        labels: torch.LongTensor | None = None,
        use_cache: bool | None = None,
        pixel_values: torch.Tensor | None = None,
        image_grid_thw: torch.LongTensor | None = None,
        detection_images: torch.Tensor | None = None,
        seg_images: torch.Tensor | None = None,
        clip_pixel_values: torch.Tensor | None = None,
        clip_images_grid_thw: torch.LongTensor | None = None,
        injected_features: dict[str, torch.Tensor] | None = None,
        action_conditions: dict[str, torch.Tensor] | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs: Any,
    ) -> VPTOutput:
        """Reference-compatible VPT forward.

        input_ids (B, L); position_ids (3, B, L) M-RoPE ids, (B, L), or None for plain 0..L-1.
        Branch inputs (`detection_images`, `seg_images`, `clip_pixel_values` + grid) are encoded
        and projected; `injected_features[branch]` (n_pads, hidden) gives already-projected
        placeholder embeddings instead. `action_conditions[branch]` (n_actions, hidden) gives the
        conditioning vectors; otherwise, with `num_inner_forward_run == 2`, they come from a first
        pass over the prefix that ends at the last action-start token (as the reference does).
        `logits_to_keep`: logits of the last n positions only (an int; 0: all), or of the positions
        a 1-D tensor lists (as transformers' models take it; `labels` then score those positions'
        next tokens).
        """
        if "past_key_values" in kwargs:
            cache = kwargs.pop("past_key_values")
        cfg = self.config
        embeds = self.embed(input_ids, pixel_values, image_grid_thw)
        batch, length = input_ids.shape
        if position_ids is None:
            position_ids = torch.arange(length, device=input_ids.device).expand(3, batch, length)
        elif position_ids.ndim == 2:
            position_ids = position_ids.expand(3, -1, -1)

        raw = self._encoder_features(detection_images, seg_images, clip_pixel_values, clip_images_grid_thw)
        injected = dict(injected_features or {})
        conditions = dict(action_conditions or {})
        actions = {b: input_ids == getattr(cfg, BRANCHES[b].action_field) for b in cfg.branches}
        needs_pass1 = [b for b in cfg.branches if actions[b].any() and b not in conditions]
        if cfg.num_inner_forward_run == 2 and needs_pass1:
            conditions.update(
                self._pass1_conditions(input_ids, embeds, raw, injected, actions, needs_pass1,
                                       attention_mask, position_ids)
            )

        embeds = self._inject(input_ids, embeds, raw, injected, conditions)
        if cfg.para_mask_id and conditions:
            embeds = _para_mask(input_ids, embeds, actions, cfg)
        embeds = _conditioned(embeds, actions, conditions)
        out = self.model.language_model(
            inputs_embeds=embeds,
            attention_mask=attention_mask,
            position_ids=position_ids,
            cache=cache,
            use_cache=use_cache,
        )
        hidden = out.last_hidden_state
        if isinstance(logits_to_keep, torch.Tensor):
            hidden_kept = hidden[:, logits_to_keep]
        else:
            hidden_kept = hidden[:, -logits_to_keep:] if logits_to_keep else hidden
        logits = self.lm_head(hidden_kept)
        loss = None
        if labels is not None and isinstance(logits_to_keep, torch.Tensor):
            targets = next_token_targets(labels, logits_to_keep).to(logits.device)
            loss = torch.nn.functional.cross_entropy(logits.float().flatten(0, 1), targets.flatten(),
                                                     ignore_index=-100)
        elif labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=cfg.text_config.vocab_size)
        return VPTOutput(loss=loss, logits=logits, last_hidden_state=hidden, cache=out.cache,
                         action_conditions=conditions or None)

    def _encoder_features(self, detection_images, seg_images, clip_pixel_values, clip_grid):
        raw: dict[str, list[torch.Tensor]] = {}
        if detection_images is not None:
            raw["dino"] = self.encode_branch("dino", detection_images)
        if seg_images is not None:
            raw["sam"] = self.encode_branch("sam", seg_images)
        if clip_pixel_values is not None:
            raw["clip"] = self.encode_branch("clip", clip_pixel_values, clip_grid)
        return raw

    def _inject(self, input_ids, embeds, raw, injected, conditions):
        """Placeholder rows <- injected features, or projected (conditioned) encoder features."""
        for branch in self.config.branches:
            spec = BRANCHES[branch]
            mask = input_ids == getattr(self.config, spec.pad_field)
            if not mask.any():
                continue
            if branch in injected:
                values = injected[branch]
            elif branch in raw:
                values = self.project_branch(branch, raw[branch], conditions.get(branch))
            else:
                raise InputMismatchError(
                    f"input has {int(mask.sum())} <|{spec.prefix}_image_pad|> tokens but no {branch} features"
                )
            embeds = _scatter(embeds, mask, values, f"<|{spec.prefix}_image_pad|>")
        return embeds

    def _pass1_conditions(self, input_ids, embeds, raw, injected, actions, branches,
                          attention_mask, position_ids) -> dict[str, torch.Tensor]:
        """Reference pass 1: hidden state at the token before each action token (the action start)."""
        positions = torch.cat([actions[b].nonzero()[:, 1] for b in branches])
        end = int(positions.max())  # h at end-1 is the last one needed
        # inject over whole rows (another row's placeholder run may straddle `end`), then cut
        e1 = self._inject(input_ids, embeds, raw, injected, {})[:, :end]
        mask1 = attention_mask[:, :end] if isinstance(attention_mask, torch.Tensor) else None
        h1 = self.model.language_model(
            inputs_embeds=e1, attention_mask=mask1, position_ids=position_ids[:, :, :end], use_cache=False
        ).last_hidden_state
        out = {}
        for b in branches:
            rows, cols = actions[b].nonzero(as_tuple=True)  # row-major order
            out[b] = h1[rows, cols - 1]
        return out


class VPTForConditionalGeneration(VPTMixin, Qwen2VLForConditionalGeneration):
    """Qwen2-VL + VPT: the paper's released models."""

    config_class = VPTConfig
    config: VPTConfig


class VPTQwen2_5ForConditionalGeneration(VPTMixin, Qwen2_5_VLForConditionalGeneration):
    """Qwen2.5-VL + VPT (window-attention vision tower; the same image M-RoPE positions)."""

    config_class = VPTQwen2_5Config
    config: VPTQwen2_5Config


VPT_MODELS: dict[type[VPTFields], type[VPTMixin]] = {
    VPTConfig: VPTForConditionalGeneration, VPTQwen2_5Config: VPTQwen2_5ForConditionalGeneration,
}
"""VPT config class -> its model class."""


def meta_model(config: VPTFields) -> VPTMixin:
    """The VPT model of `config` on the meta device: no weights allocated, nothing initialised (the
    context is this thread's); `VPTMixin.load_weights` gives it its weights."""
    with torch.device("meta"):
        return vpt_model_class(config)(config)


def vpt_model_class(config: VPTFields) -> type[VPTMixin]:
    """The VPT model class for `config` (a `VPTConfig` or `VPTQwen2_5Config`)."""
    model_class = next((m for c, m in VPT_MODELS.items() if isinstance(config, c)), None)
    if model_class is None:
        raise ConfigError(f"{type(config).__name__} is not a VPT config ({[c.__name__ for c in VPT_MODELS]})")
    return model_class


def _materialize_buffers(model: VPTMixin, device: torch.device) -> None:
    """The buffers no checkpoint holds (rotary frequencies), computed on `device` as transformers'
    initialisation computes them; anything else still without data is a checkpoint error."""
    for module in model.modules():
        buffers = [name for name, buffer in module.named_buffers(recurse=False) if buffer.is_meta]
        for name in buffers:
            module.register_buffer(name, torch.empty_like(getattr(module, name), device=device), persistent=False)
        if buffers:
            model._init_weights(module)
    if missing := [name for name, tensor in model.state_dict(keep_vars=True).items() if tensor.is_meta]:
        raise CheckpointError(f"the checkpoint holds no weights for {missing[:8]}")


def _conditioned(embeds: torch.Tensor, actions: dict[str, torch.Tensor], conditions: dict[str, torch.Tensor]
                 ) -> torch.Tensor:
    """Each branch's action-token embeddings <- its conditioning vectors."""
    for branch, cond in conditions.items():
        embeds = _scatter(embeds, actions[branch], cond, f"<|{BRANCHES[branch].prefix}_action|>")
    return embeds


def _scatter(embeds: torch.Tensor, mask: torch.Tensor, values: torch.Tensor, what: str) -> torch.Tensor:
    """embeds[mask] <- values (row-major), checking that the counts agree."""
    n = int(mask.sum())
    if n != values.shape[0]:
        raise InputMismatchError(f"{n} {what} positions but {values.shape[0]} feature rows were given")
    if n == 0:
        return embeds
    return embeds.masked_scatter(mask.unsqueeze(-1), values.to(embeds.dtype))


def _para_mask(input_ids, embeds, actions, cfg) -> torch.Tensor:
    """Zero the first user turn (and with para_mask_id 2 the 4th turn) in rows holding an action.

    The reference masks with probability `para_mask_ratio`; at 1.0 (the released value) always.
    """
    has_action = torch.stack([m.any(1) for m in actions.values()]).any(0)
    turns = (1,) if cfg.para_mask_id == 1 else (1, 3)
    keep = torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
    for row in has_action.nonzero()[:, 0].tolist():
        if cfg.para_mask_ratio < 1 and torch.rand(()) >= cfg.para_mask_ratio:
            continue
        starts = (input_ids[row] == cfg.para_start_id).nonzero()[:, 0]
        ends = (input_ids[row] == cfg.para_end_id).nonzero()[:, 0]
        for t in turns:
            if t < len(starts) and t < len(ends):
                keep[row, starts[t] + 1 : ends[t]] = False
    return embeds * keep.unsqueeze(-1).to(embeds.dtype)
