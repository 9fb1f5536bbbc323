"""A tiny third-party splitcem plugin: a defense and a model, found through entry points."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from splitcem.defenses import Defense

__all__ = ["UniformNoise", "toy_cnn"]


class UniformNoise(Defense):
    """Add uniform noise U(-scale, scale) to every feature (the toy plugin's defense).

    Args:
        scale: Half-width of the noise interval (>= 0).
    """

    def __init__(self, *, scale: float = 0.1) -> None:
        super().__init__()
        if scale < 0:
            raise ValueError(f"toy_uniform scale must be >= 0, got {scale}")
        self.scale = float(scale)

    def transform(self, z: Tensor) -> Tensor:
        return z + self.scale * (2 * torch.rand_like(z) - 1)


def toy_cnn(*, num_classes: int = 10, in_channels: int = 3) -> nn.Module:
    """A small chain-shaped CNN (cut it at "4", the sigmoid: 4 x H/2 x W/2 features)."""
    return nn.Sequential(
        nn.Conv2d(in_channels, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(8, 4, 3, padding=1), nn.Sigmoid(),
        nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        nn.Linear(16, num_classes),
    )
