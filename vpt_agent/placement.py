"""Where a model runs and in what dtype. Apart from `vpt_agent.model` (whose import loads
transformers) so that the CLI can name the placement before it loads a model."""
from __future__ import annotations

import torch

from .errors import ConfigError


def placement(device: str | torch.device | None = None, dtype: str | torch.dtype | None = None
              ) -> tuple[torch.device, torch.dtype]:
    """Where and in what a model runs: by default the GPU in bfloat16 when there is one, else the CPU
    in float32. `dtype` may be named ("bfloat16")."""
    device = torch.device(device if device is not None else "cuda" if torch.cuda.is_available() else "cpu")
    if isinstance(dtype, str):
        named = getattr(torch, dtype, None)
        if not isinstance(named, torch.dtype) or not named.is_floating_point:
            raise ConfigError(f"unknown dtype {dtype!r}; expected float32, bfloat16 or float16")
        dtype = named
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
