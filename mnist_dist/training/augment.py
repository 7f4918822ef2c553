"""Data augmentation on whole batches of tensors (no per-image PIL work)."""
import math

import torch
import torch.nn.functional as F

MAX_ROTATION_DEG = 10.0
MAX_SCALE = 0.1  # zoom in or out by up to 10%
MAX_SHIFT_PX = 2.0


def random_affine(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Rotate, scale and shift each image of a [N,1,28,28] batch by its own small random amount.

    Digits stay readable (a 6 never becomes a 9); the empty border of MNIST
    absorbs the shift. ``generator`` lives on the images' device and is
    checkpointed, so resumed runs draw the same transforms.
    """
    n = images.shape[0]
    draw = torch.rand(n, 4, generator=generator, device=images.device) * 2 - 1  # uniform in [-1, 1)
    angle = draw[:, 0] * math.radians(MAX_ROTATION_DEG)
    scale = 1 + draw[:, 1] * MAX_SCALE
    shift = draw[:, 2:] * (2 * MAX_SHIFT_PX / images.shape[-1])  # affine_grid works in [-1, 1] units
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta.to(images.dtype), list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
