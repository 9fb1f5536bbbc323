"""The toy plugin's attack module: importing it registers ``toy_gray``."""

from __future__ import annotations

import torch
from torch import Tensor

from splitcem.attacks import Attack, AttackTarget, register_attack


@register_attack("toy_gray")
class GrayAttack(Attack):
    """Reconstruct every image as mid-gray (the toy plugin's attack)."""

    requires = "outputs"

    def reconstruct(self, target: AttackTarget, z: Tensor) -> Tensor:
        return torch.full((z.shape[0], *target.image_shape), 0.5, device=z.device)
