"""VPT configs: a base model's config (Qwen2-VL, Qwen2.5-VL) plus the Visual Perception Token fields
of the released checkpoints, one class per base sharing `VPTFields`."""
from __future__ import annotations

from typing import Any

from transformers import Qwen2_5_VLConfig, Qwen2VLConfig

from ..errors import ConfigError
from ..perception.dino import DINOV2_DEFAULTS
from ..perception.sam import SAM_VISION_DEFAULTS
from ..tokens import BRANCHES

# The paper's code fetched these two encoders from the hub; their architectures are spelled out
# here so that a released config.json (which lacks them) builds without any download.
DINOV2_LARGE: dict[str, Any] = {
    **DINOV2_DEFAULTS, "model_type": "dinov2", "image_size": 518,
    "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
}
SAM_VIT_LARGE: dict[str, Any] = {
    **SAM_VISION_DEFAULTS, "hidden_size": 1024, "num_hidden_layers": 24, "num_attention_heads": 16,
    "global_attn_indexes": [5, 11, 17, 23], "mlp_dim": 4096,
}

# Token-id fields every VPT config must carry (the released configs set all of them).
REQUIRED_ID_FIELDS = (
    "image_token_id",
    "vision_start_token_id",
    "vision_end_token_id",
    *(f for b in BRANCHES.values() for f in (b.start_field, b.action_field, b.pad_field)),
    "para_start_id",
    "para_end_id",
)


class VPTFields:
    """The VPT fields (DESIGN.md §2) added to a base config; unknown fields of a checkpoint are kept.

    `vision_encoder_ls` names the re-encoding branches (["dino"], ["sam"], ["clip"], or several);
    `detection_encoder_config` / `seg_encoder_config` hold the DINOv2 / SAM architectures
    (transformers `Dinov2Config` / `SamVisionConfig` dicts) and default to the released ones.
    `image_max_pixels` caps the pixels of every image the ViT sees (None: the Qwen2-VL processor's
    budget, as the released models use; the bundled demo model sees ~224x224); `clip_max_pixels`
    caps those of the clip branch's re-encoding (None: `image_max_pixels`, as the released models
    do), so that a re-encoding can show the model what its view of the image lacks.
    """

    model_type: str
    base_model_type: str
    """The `model_type` of the plain base model (a checkpoint of it plus the VPT fields loads too)."""

    def __post_init__(self, **kwargs: Any) -> None:
        defaults: dict[str, Any] = {
            "vision_encoder_ls": ["dino"],
            "num_inner_forward_run": 2,
            "projector_scale": 1,
            "para_mask_id": 0,
            "para_mask_ratio": 1.0,
            "alignment": False,
            "image_max_pixels": None,
            "clip_max_pixels": None,
        }
        for key, value in defaults.items():
            kwargs.setdefault(key, value)
        for field in REQUIRED_ID_FIELDS[3:]:
            kwargs.setdefault(field, None)
        if kwargs.get("detection_encoder_config") is None:
            kwargs["detection_encoder_config"] = dict(DINOV2_LARGE)
        if kwargs.get("seg_encoder_config") is None:
            kwargs["seg_encoder_config"] = dict(SAM_VIT_LARGE)
        super().__post_init__(**kwargs)

    @property
    def branches(self) -> tuple[str, ...]:
        """The re-encoding branches this model has, in the library's names ("dino", "sam", "clip")."""
        return tuple(self.vision_encoder_ls)

    @property
    def reencode_max_pixels(self) -> int | None:
        """The clip branch's pixel budget: `clip_max_pixels`, else `image_max_pixels`."""
        return self.clip_max_pixels if self.clip_max_pixels is not None else self.image_max_pixels

    def validate_vpt(self) -> None:
        """Raise `ConfigError` naming every missing VPT field or unknown branch."""
        missing = [f for f in REQUIRED_ID_FIELDS if getattr(self, f, None) is None]
        if missing:
            raise ConfigError(
                f"config lacks the VPT fields {missing}: this is not a VPT config "
                f"(model_type '{self.model_type}' with detection_/clip_/seg_ token ids)"
            )
        unknown = [b for b in self.vision_encoder_ls if b not in BRANCHES]
        if unknown or not isinstance(self.vision_encoder_ls, (list, tuple)):
            raise ConfigError(
                f"vision_encoder_ls names unknown branches {unknown}; known: {sorted(BRANCHES)}"
            )
        if self.num_inner_forward_run not in (1, 2):
            raise ConfigError(f"num_inner_forward_run must be 1 or 2, got {self.num_inner_forward_run}")
        if self.projector_scale != 1:
            raise ConfigError(
                f"projector_scale={self.projector_scale} is not supported (the released models use 1)"
            )


class VPTConfig(VPTFields, Qwen2VLConfig):
    """Qwen2-VL's config with the VPT fields: the paper's released checkpoints."""

    model_type = "qwen2_vl_vpt"
    base_model_type = "qwen2_vl"


class VPTQwen2_5Config(VPTFields, Qwen2_5_VLConfig):
    """Qwen2.5-VL's config with the VPT fields."""

    model_type = "qwen2_5_vl_vpt"
    base_model_type = "qwen2_5_vl"


VPT_CONFIGS: dict[str, type[VPTFields]] = {c.model_type: c for c in (VPTConfig, VPTQwen2_5Config)}
"""VPT model_type -> its config class."""


def config_class_for(model_type: str | None) -> type[VPTFields] | None:
    """The VPT config class of a checkpoint's `model_type` (the VPT one or its plain base's), else None."""
    return next((c for c in VPT_CONFIGS.values() if model_type in (c.model_type, c.base_model_type)), None)
