"""Re-encoding tools: run one branch encoder on a full-resolution image, with its preprocessing."""
from __future__ import annotations

import torch

from .dino import preprocess_dino
from .qwen_image import qwen_pixel_values
from .sam import preprocess_sam


def branch_inputs(branch: str, image: torch.Tensor, max_pixels: int | None = None) -> dict[str, torch.Tensor]:
    """The reference forward's encoder inputs for one uint8 (3,H,W) image (batch of one);
    ``max_pixels`` is the model's ``image_max_pixels`` (clip only)."""
    if branch == "dino":
        return {"detection_images": preprocess_dino(image)[None]}
    if branch == "sam":
        return {"seg_images": preprocess_sam(image)[None]}
    pixel_values, grid = qwen_pixel_values([image], max_pixels=max_pixels)
    return {"clip_pixel_values": pixel_values, "clip_images_grid_thw": grid}


@torch.no_grad()
def branch_features(model, branch: str, image: torch.Tensor) -> torch.Tensor:
    """Raw features of `branch` for a uint8 (3,H,W) image on the model's device:
    dino (256, d), sam (C, 64, 64), clip (t*h*w/4, hidden) from the model's own ViT."""
    model.projector(branch)  # a clear MissingBranchError before any work
    param = next(model.parameters())
    inputs = branch_inputs(branch, image.to(param.device), model.config.image_max_pixels)
    images, *grid = (v.to(param.device) for v in inputs.values())
    if images.is_floating_point():
        images = images.to(param.dtype)
    return model.encode_branch(branch, images, *grid)[0]
