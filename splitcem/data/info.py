"""Dataset descriptions and per-dataset normalisation constants (the reference code's)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["NORMALIZATION", "DatasetInfo"]

# name -> (mean, std) per channel, on images scaled to [0, 1].
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.247, 0.243, 0.261)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "facescrub": ((0.5708, 0.5905, 0.4272), (0.2058, 0.2275, 0.2098)),
    "tinyimagenet": ((0.5141, 0.5775, 0.3985), (0.2927, 0.2570, 0.1434)),
    "mnist": ((0.1307,), (0.3081,)),
    "fashion_mnist": ((0.2860,), (0.3530,)),
}


@dataclass(frozen=True)
class DatasetInfo:
    """What a model and an attack need to know about a dataset.

    ``normalize`` / ``denormalize`` work on (B, C, H, W) tensors on any device; metrics are
    computed on ``denormalize(x)``, which is clamped to [0, 1].

    Example:
        >>> info = DatasetInfo("toy", 2, 1, 4, (0.5,), (0.25,), ("a", "b"))
        >>> info.normalize(torch.ones(1, 1, 4, 4)).max().item()
        2.0
    """

    name: str
    num_classes: int
    channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    classes: tuple[str, ...]

    def __post_init__(self) -> None:
        if len(self.mean) != self.channels or len(self.std) != self.channels:
            raise ValueError(
                f"{self.name}: mean/std need {self.channels} values each, got "
                f"{len(self.mean)} and {len(self.std)}"
            )
        if any(s <= 0 for s in self.std):
            raise ValueError(f"{self.name}: std must be positive, got {self.std}")
        if len(self.classes) != self.num_classes:
            raise ValueError(
                f"{self.name}: {self.num_classes} classes but {len(self.classes)} class names"
            )

    def _stats(self, x: Tensor) -> tuple[Tensor, Tensor]:
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device).view(1, -1, 1, 1)
        return mean, std

    def normalize(self, x01: Tensor) -> Tensor:
        """Images in [0, 1], (B, C, H, W) -> the model's input scale."""
        mean, std = self._stats(x01)
        return (x01 - mean) / std

    def denormalize(self, x: Tensor) -> Tensor:
        """Model-scale (B, C, H, W) -> images in [0, 1] (clamped, for metrics and figures)."""
        mean, std = self._stats(x)
        return (x * std + mean).clamp_(0.0, 1.0)
