"""Gaussian noise on the features: the base obfuscation CEM builds on."""

from __future__ import annotations

import torch
from torch import Tensor

from splitcem._validate import check_float
from splitcem.defenses.base import Defense, register_defense

__all__ = ["GaussianNoise"]


@register_defense("noise")
class GaussianNoise(Defense):
    """Add N(0, sigma^2) noise to every feature, in training, evaluation and deployment.

    Args:
        sigma: Noise standard deviation. Features after the sigmoid lie in (0, 1); the paper
            uses sigma in {0.01, 0.025, 0.05, 0.1, 0.15}. 0 disables the defense.
    """

    strength_param = "sigma"
    mid_epoch_resumable = True  # nothing accumulates within an epoch

    def __init__(self, *, sigma: float = 0.1) -> None:
        super().__init__()
        sigma = check_float("noise sigma", sigma)
        self.sigma = sigma
        self.noise_sigma = sigma

    def transform(self, z: Tensor) -> Tensor:
        if self.sigma == 0:
            return z
        return z + self.sigma * torch.randn_like(z)
