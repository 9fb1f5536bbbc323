"""CIFAR-style ResNet-20 (He et al. 2016, section 4.2) as a cuttable :class:`Backbone`.

A "layer" (the unit ``cut`` counts) is the stem (conv3x3-BN-ReLU) or one basic block, so
ResNet-20 has 1 + 3 * 3 = 10 layers and ``cut=5`` puts the stem, the three stage-1 blocks
and the first (downsampling) stage-2 block on the client. The reference widens the three
stages to 32/64/128 channels (He et al. use 16/32/64); ``widths`` sets them. A block whose
shape changes uses a 1x1 conv + BN shortcut (option B), so every layer is a plain module.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch.nn.functional as F
from torch import Tensor, nn

from splitcem.models.backbone import Backbone, scale_channels
from splitcem.models.registry import register_model

__all__ = ["BasicBlock", "make_resnet", "resnet20"]


def _conv_out(size: int, stride: int) -> int:
    """Spatial size after a 3x3 conv with padding 1."""
    return (size - 1) // stride + 1


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus shortcut, then ReLU."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.shortcut: nn.Module = nn.Identity()
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
                nn.BatchNorm2d(out_channels),
            )

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, C_out, H/stride, W/stride)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


def make_resnet(
    blocks: Sequence[int],
    widths: Sequence[int],
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    width: float = 1.0,
) -> Backbone:
    """Build a CIFAR-style ResNet: stem, then stages of basic blocks, then avg pool + Linear.

    Args:
        blocks: Basic blocks per stage; each stage after the first starts with stride 2.
        widths: Channels per stage (before the width multiplier); the stem has ``widths[0]``.
        num_classes: Logits produced by the head.
        in_channels: Input channels.
        image_size: Input height = width.
        width: Multiplier applied to every channel count (rounded, at least 1).
    """
    if len(blocks) != len(widths):
        raise ValueError(f"blocks {tuple(blocks)} and widths {tuple(widths)} differ in length")
    c = scale_channels(widths[0], width)
    s = image_size
    layers: list[nn.Module] = [
        nn.Sequential(
            nn.Conv2d(in_channels, c, 3, padding=1, bias=False),
            nn.BatchNorm2d(c),
            nn.ReLU(inplace=True),
        )
    ]
    channels, sizes, names = [c], [s], ["stem"]
    for stage, (n, w) in enumerate(zip(blocks, widths, strict=True)):
        out = scale_channels(w, width)
        for b in range(n):
            stride = 2 if stage > 0 and b == 0 else 1
            layers.append(BasicBlock(c, out, stride))
            c, s = out, _conv_out(s, stride)
            channels.append(c)
            sizes.append(s)
            names.append(f"block{stage + 1}.{b + 1}")
    head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(c, num_classes))
    return Backbone(
        layers,
        channels=channels,
        sizes=sizes,
        names=names,
        head=head,
        in_channels=in_channels,
        image_size=image_size,
    )


@register_model("resnet20")
def resnet20(*, widths: Sequence[int] = (32, 64, 128), **kwargs) -> Backbone:
    """ResNet-20 (3 stages of 3 basic blocks, 10 cuttable layers), stages widened to 32/64/128."""
    return make_resnet((3, 3, 3), widths, **kwargs)
