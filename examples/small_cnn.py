"""The user's own model: a small CIFAR-10 CNN. Nothing in it knows about splitcem.

Its features block narrows to 8 channels and squashes them with a sigmoid after the second
pool (``features.9``): that is where the examples cut it, so the client sends 8 x 8 x 8
features in (0, 1), the layout the CEM paper uses.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def conv_bn_relu(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class SmallCNN(nn.Module):
    """conv32-pool-conv64-pool-squeeze8-sigmoid | conv64-conv128-pool-conv128-avgpool-linear."""

    def __init__(self, num_classes: int = 10, in_channels: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(
            *conv_bn_relu(in_channels, 32), nn.MaxPool2d(2),  # 0-3: 32 x 16 x 16
            *conv_bn_relu(32, 64), nn.MaxPool2d(2),  # 4-7: 64 x 8 x 8
            nn.Conv2d(64, 8, 3, padding=1), nn.Sigmoid(),  # 8-9: 8 x 8 x 8, in (0, 1)
            *conv_bn_relu(8, 64), *conv_bn_relu(64, 128), nn.MaxPool2d(2),  # 10-16: 128 x 4 x 4
            *conv_bn_relu(128, 128), nn.AdaptiveAvgPool2d(1),  # 17-20: 128 x 1 x 1
        )
        self.classifier = nn.Linear(128, num_classes)

    def forward(self, x: Tensor) -> Tensor:  # (B, C, 32, 32) -> (B, num_classes)
        return self.classifier(torch.flatten(self.features(x), 1))
