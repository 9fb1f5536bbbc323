"""Batched, vectorised augmentation on (B, C, H, W) tensors in [0, 1], on any device.

Random crop with padding, horizontal flip and rotation are composed into one affine map per
image and applied with a single ``grid_sample`` call (no per-sample Python loop). Integer
translations and flips land exactly on pixel centres, so without rotation the result equals
the classic pad-crop-flip up to float rounding. Random parameters come from a CPU
``torch.Generator``, so they are identical on every device.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Augment", "AugmentParams"]


class AugmentParams(NamedTuple):
    """Per-image random draws: shifts in pixels (B,), flips (B,) bool, angles in degrees (B,)."""

    dx: Tensor
    dy: Tensor
    flip: Tensor
    angle: Tensor


@dataclass(frozen=True)
class Augment:
    """Training augmentation (the reference's: random crop, flip, rotation 15).

    Args:
        crop_pad: Pad by this many pixels and crop back at a random offset (0 = off).
        flip: Mirror horizontally with probability 1/2.
        rotation: Rotate by an angle drawn uniformly from [-rotation, rotation] degrees.
        padding_mode: What fills pixels from outside the image: "zeros" or "reflection".

    Example:
        >>> aug = Augment()
        >>> aug(torch.rand(4, 3, 32, 32), torch.Generator().manual_seed(0)).shape
        torch.Size([4, 3, 32, 32])
    """

    crop_pad: int = 4
    flip: bool = True
    rotation: float = 15.0
    padding_mode: str = "zeros"

    def __post_init__(self) -> None:
        if self.crop_pad < 0 or self.rotation < 0:
            raise ValueError(f"crop_pad and rotation must be >= 0, got {self.crop_pad}, "
                             f"{self.rotation}")
        if self.padding_mode not in ("zeros", "reflection"):
            raise ValueError(f"padding_mode must be 'zeros' or 'reflection', got "
                             f"{self.padding_mode!r}")

    @property
    def active(self) -> bool:
        """Whether this augmentation changes images at all."""
        return self.crop_pad > 0 or self.flip or self.rotation > 0

    def sample(self, batch: int, generator: torch.Generator) -> AugmentParams:
        """Draw the random parameters of ``batch`` images (on the CPU)."""
        p = self.crop_pad
        shifts = torch.randint(-p, p + 1, (2, batch), generator=generator)
        flip = torch.rand(batch, generator=generator) < 0.5
        angle = (torch.rand(batch, generator=generator) * 2 - 1) * self.rotation
        if not self.flip:
            flip = torch.zeros_like(flip)
        return AugmentParams(shifts[0], shifts[1], flip, angle)

    def apply(self, x: Tensor, params: AugmentParams) -> Tensor:
        """Augment ``x`` (B, C, H, W) float in [0, 1] with given parameters; shape is kept."""
        if not self.active or x.shape[0] == 0:
            return x
        b, _, h, w = x.shape
        dev, dt = x.device, x.dtype
        rad = params.angle.to(dev, dt) * (math.pi / 180)
        cos, sin = torch.cos(rad), torch.sin(rad)
        sx = 1.0 - 2.0 * params.flip.to(dev, dt)  # -1 mirrors
        # theta maps output coords to input coords (normalised, align_corners=False):
        # input = R @ (sx * u, v) + t, with a shift of d pixels = 2 d / size.
        theta = torch.empty(b, 2, 3, device=dev, dtype=dt)  # (B, 2, 3)
        theta[:, 0, 0] = cos * sx
        theta[:, 0, 1] = -sin * (h / w)
        theta[:, 0, 2] = params.dx.to(dev, dt) * (2.0 / w)
        theta[:, 1, 0] = sin * sx * (w / h)
        theta[:, 1, 1] = cos
        theta[:, 1, 2] = params.dy.to(dev, dt) * (2.0 / h)
        grid = F.affine_grid(theta, [b, x.shape[1], h, w], align_corners=False)  # (B, H, W, 2)
        mode = "bilinear" if self.rotation > 0 else "nearest"  # shifts/flips: exact pixels
        return F.grid_sample(x, grid, mode=mode, padding_mode=self.padding_mode,
                             align_corners=False)

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        """Draw parameters from ``generator`` and augment ``x`` (B, C, H, W) in [0, 1]."""
        return self.apply(x, self.sample(x.shape[0], generator))
