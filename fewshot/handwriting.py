"""Augmentation for handwritten characters: affine warps, stroke width and rotations as classes.

Affine distortions are what let Koch et al. 2015's Siamese network (8% error on Lake et al.'s
within-alphabet runs) generalise from 30 alphabets; rotating each character by multiples of 90
degrees to make new classes is the Omniglot protocol of Santoro et al. 2016 and Finn et al. 2017.
Images are inverted (strokes 1, background 0), so zero padding is blank paper.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass(frozen=True)
class HandwritingAugment:
    """Ranges of the random warp (degrees, scale, shear, shift as a share of the side) and strokes."""

    degrees: float = 12.0
    scale: tuple[float, float] = (0.85, 1.15)
    shear: float = 0.2
    shift: float = 0.08
    # Stroke width: blend towards a 3x3 dilation (up to `thicken`) or erosion (up to `thin`).
    thicken: float = 0.8
    thin: float = 0.4


def _uniform(n: int, low: float, high: float, generator: torch.Generator) -> Tensor:
    return torch.rand(n, generator=generator) * (high - low) + low


def warp(x: Tensor, aug: HandwritingAugment, generator: torch.Generator) -> Tensor:
    """Random affine warp of float images [B, C, S, S] (strokes bright on 0), zero padding."""
    n = x.shape[0]
    angle = _uniform(n, -aug.degrees, aug.degrees, generator) * (math.pi / 180)
    scale = _uniform(n, *aug.scale, generator)
    shear = _uniform(n, -aug.shear, aug.shear, generator)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.zeros(n, 2, 3)
    # The sampling grid's inverse map: rotation and scale, then shear along x.
    theta[:, 0, 0] = cos + shear * sin
    theta[:, 0, 1] = -sin + shear * cos
    theta[:, 1, 0] = sin
    theta[:, 1, 1] = cos
    theta[:, 0, 2] = _uniform(n, -2 * aug.shift, 2 * aug.shift, generator)
    theta[:, 1, 2] = _uniform(n, -2 * aug.shift, 2 * aug.shift, generator)
    grid = F.affine_grid(theta.to(x.device), list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def stroke_width(x: Tensor, aug: HandwritingAugment, generator: torch.Generator) -> Tensor:
    """Thicker or thinner strokes: each image [B, C, S, S] blended with its dilation or erosion."""
    n = x.shape[0]
    amount = _uniform(n, -aug.thin, aug.thicken, generator).view(n, 1, 1, 1).to(x.device)
    dilated = F.max_pool2d(x, 3, stride=1, padding=1)
    eroded = -F.max_pool2d(-x, 3, stride=1, padding=1)
    target = torch.where(amount >= 0, dilated, eroded)
    return x + amount.abs() * (target - x)


def augment_handwriting(
    images: Tensor, aug: HandwritingAugment, generator: torch.Generator
) -> Tensor:
    """uint8 images [B, C, S, S] -> float [B, C, S, S] in [0, 1], warped and re-stroked."""
    x = images.float().div_(255.0)
    return stroke_width(warp(x, aug, generator), aug, generator).clamp_(0.0, 1.0)


def rotate_as_classes(x: Tensor, y: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Rotate each image [B, C, S, S] by k * 90 degrees (k random) and relabel it 4 y + k."""
    k = torch.randint(0, 4, (x.shape[0],), generator=generator).to(x.device)
    out = x.clone()
    for turn in range(1, 4):
        picked = k == turn
        if bool(picked.any()):
            out[picked] = torch.rot90(x[picked], turn, dims=(-2, -1))
    return out, y * 4 + k
