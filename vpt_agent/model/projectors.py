"""The conditioned projectors that map re-encoding features into the LLM's embedding space.

For branch features F and a conditioning vector h (the LLM hidden state at the action-start
token), with c = Linear(LayerNorm(h)):

    f_t = feature(F)_t          per-token projection into the LLM width
    out_t = f_t + <f_t, c> c    (a raw dot product: no scaling, no softmax)

Without a condition the output is f. Parameter names follow the released checkpoints.
"""
from __future__ import annotations

import torch
from torch import nn


class ConditionedProjector(nn.Module):
    """Shared conditioning of the three branch projectors; subclasses define `project`."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.layernorm_condition = nn.LayerNorm(hidden_size)
        self.linear_condition = nn.Linear(hidden_size, hidden_size)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(N, S, d_enc)-like branch features -> (N, S', hidden)."""
        raise NotImplementedError

    def forward(self, features: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """features: one entry per encoder image; condition: (N, hidden) or None -> (N, S', hidden)."""
        f = self.project(features)
        if condition is None:
            return f
        c = self.linear_condition(self.layernorm_condition(condition.to(f.dtype)))  # (N, hidden)
        a = torch.einsum("nsh,nh->ns", f, c)  # (N, S')
        return f + a.unsqueeze(-1) * c.unsqueeze(1)


class LinearProjector(ConditionedProjector):
    """DINOv2 branch: LayerNorm then Linear over patch tokens (N, 256, d_enc)."""

    def __init__(self, encoder_size: int, hidden_size: int) -> None:
        super().__init__(hidden_size)
        self.layernorm_feature = nn.LayerNorm(encoder_size)
        self.linear_feature = nn.Linear(encoder_size, hidden_size)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_feature(self.layernorm_feature(features))


class ConvProjector(ConditionedProjector):
    """SAM branch: channel LayerNorm on the (N, C, 64, 64) map, then a 4x4 stride-4 conv -> 256 tokens."""

    def __init__(self, encoder_size: int, hidden_size: int) -> None:
        super().__init__(hidden_size)
        self.layernorm_feature = nn.LayerNorm(encoder_size)
        self.conv_feature = nn.Conv2d(encoder_size, hidden_size, kernel_size=4, stride=4)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        x = self.layernorm_feature(features.permute(0, 2, 3, 1))  # NHWC
        x = self.conv_feature(x.permute(0, 3, 1, 2))  # (N, hidden, 16, 16)
        return x.flatten(2).transpose(1, 2)  # (N, 256, hidden), row-major over the grid


class IdentityProjector(ConditionedProjector):
    """CLIP branch (the model's own ViT): features are already in the LLM width; only conditioning."""

    def __init__(self, encoder_size: int, hidden_size: int) -> None:
        super().__init__(hidden_size)

    def project(self, features: torch.Tensor) -> torch.Tensor:
        return features


PROJECTORS: dict[str, type[ConditionedProjector]] = {
    "dino": LinearProjector,
    "sam": ConvProjector,
    "clip": IdentityProjector,
}

# Parameters the released checkpoints carry but the reference never uses.
UNUSED_PROJECTOR_KEYS = {
    "sam": ("linear_feature.weight", "linear_feature.bias"),
    "clip": (
        "layernorm_feature.weight",
        "layernorm_feature.bias",
        "linear_feature.weight",
        "linear_feature.bias",
    ),
}
