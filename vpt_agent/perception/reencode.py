"""Re-encoding tools: run one branch encoder on full-resolution images, with its preprocessing."""
from __future__ import annotations

from collections.abc import Sequence

import torch

from .dino import preprocess_dino
from .qwen_image import qwen_pixel_values
from .sam import preprocess_sam


def branch_inputs(branch: str, image: torch.Tensor, max_pixels: int | None = None) -> dict[str, torch.Tensor]:
    """The reference forward's encoder inputs for one uint8 (3,H,W) image (batch of one);
    ``max_pixels`` is the model's ``config.reencode_max_pixels`` (clip only)."""
    if branch == "dino":
        return {"detection_images": preprocess_dino(image)[None]}
    if branch == "sam":
        return {"seg_images": preprocess_sam(image)[None]}
    pixel_values, grid = qwen_pixel_values([image], max_pixels=max_pixels)
    return {"clip_pixel_values": pixel_values, "clip_images_grid_thw": grid}


@torch.no_grad()
def branch_features(model, branch: str, images: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Raw features of `branch` for uint8 (3,H,W) images, on the model's device, from one encoder
    call: dino (256, d), sam (C, 64, 64), clip (t*h*w/4, hidden) from the model's own ViT, each."""
    model.projector(branch)  # a clear MissingBranchError before any work
    param = next(model.parameters())
    images = [image.to(param.device) for image in images]
    if branch == "clip":
        pixel_values, grid = qwen_pixel_values(images, model.image_processor, max_pixels=model.config.reencode_max_pixels)
        return model.encode_branch(branch, pixel_values.to(param.dtype), grid)
    preprocess = preprocess_dino if branch == "dino" else preprocess_sam
    return model.encode_branch(branch, torch.stack([preprocess(image) for image in images]).to(param.dtype))
