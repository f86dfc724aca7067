"""Greedy decoding the way the paper's code does it: every new token comes from a full forward
over the whole conversation (two inner passes, no KV cache, M-RoPE ids from `get_rope_index`).

It is the correctness oracle for `VPTSession` and the baseline of the benchmarks; nothing on the
serving path uses it.
"""
from __future__ import annotations

from collections.abc import Collection

import torch

from .modeling import VPTMixin


def rope_index(model: VPTMixin, input_ids: torch.Tensor, image_grid_thw: torch.Tensor | None):
    """(3, B, L) M-RoPE ids of whole conversations; only `<|image_pad|>` runs count as images."""
    if image_grid_thw is None:
        return None
    token_types = (input_ids == model.config.image_token_id).int()
    positions, _ = model.model.get_rope_index(input_ids, mm_token_type_ids=token_types, image_grid_thw=image_grid_thw)
    return positions


@torch.no_grad()
def recompute_greedy(
    model: VPTMixin,
    ids: list[int],
    *,
    stop_ids: Collection[int],
    max_new_tokens: int,
    suppressed: Collection[int] = (),
    pixel_values: torch.Tensor | None = None,
    image_grid_thw: torch.Tensor | None = None,
    **branch_inputs: torch.Tensor,
) -> list[int]:
    """Continue one conversation greedily, recomputing everything at every step.

    `suppressed` token ids are never chosen (the session suppresses placeholder tokens).
    `branch_inputs` are the reference forward's encoder inputs (`detection_images`, `seg_images`,
    `clip_pixel_values` + `clip_images_grid_thw`) for the placeholder runs in `ids`.
    """
    device = next(model.parameters()).device
    ids = list(ids)
    new: list[int] = []
    for _ in range(max_new_tokens):
        input_ids = torch.tensor([ids], device=device)
        out = model(
            input_ids=input_ids,
            position_ids=rope_index(model, input_ids, image_grid_thw),
            pixel_values=pixel_values,
            image_grid_thw=image_grid_thw,
            use_cache=False,
            logits_to_keep=1,
            **branch_inputs,
        )
        logits = out.logits[0, -1].clone()
        logits[list(suppressed)] = float("-inf")
        token = int(logits.argmax())
        new.append(token)
        ids.append(token)
        if token in stop_ids:
            break
    return new
