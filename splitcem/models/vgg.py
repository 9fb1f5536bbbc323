"""VGG with batch norm (VGG-11/13/16), CIFAR-style, as a cuttable :class:`Backbone`.

Why this shape: the CEM reference splits VGG-11-BN after entry 4 of its layer config, so a
"layer" here is one config entry: an int ``v`` is conv3x3(v, bias)-BN-ReLU, ``"M"`` is a 2x2
max pool. Pools that would shrink a map below 1x1 (e.g. the fifth pool on 28x28 inputs) are
replaced by identities, and the head averages whatever map is left to 1x1 before a single
Linear layer, so 28, 32, 48 and 64 pixel inputs all work with the same config.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

from splitcem.models.backbone import Backbone, scale_channels
from splitcem.models.registry import register_model

__all__ = ["make_vgg", "vgg11_bn", "vgg13_bn", "vgg16_bn"]

VggConfig = Sequence[int | str]


def make_vgg(
    cfg: VggConfig,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    width: float = 1.0,
) -> Backbone:
    """Build a VGG-BN backbone from a layer config (ints = conv widths, "M" = max pool).

    Args:
        cfg: The layer config; each entry is one cuttable layer.
        num_classes: Logits produced by the head.
        in_channels: Input channels (1 for grayscale).
        image_size: Input height = width.
        width: Multiplier applied to every conv's channel count (rounded, at least 1).
    """
    layers: list[nn.Module] = []
    channels: list[int] = []
    sizes: list[int] = []
    names: list[str] = []
    c, s = in_channels, image_size
    for v in cfg:
        if v == "M":
            if s >= 2:
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                s //= 2
                names.append("pool")
            else:  # the map is already 1x1: pooling would empty it
                layers.append(nn.Identity())
                names.append("pool(skip)")
        elif isinstance(v, int):
            out = scale_channels(v, width)
            layers.append(
                nn.Sequential(
                    nn.Conv2d(c, out, kernel_size=3, padding=1),
                    nn.BatchNorm2d(out),
                    nn.ReLU(inplace=True),
                )
            )
            names.append(f"conv{v}")
            c = out
        else:
            raise ValueError(f"VGG config entries must be ints or 'M', got {v!r}")
        channels.append(c)
        sizes.append(s)
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


@register_model("vgg11_bn")
def vgg11_bn(**kwargs) -> Backbone:
    """VGG-11 with batch norm (config "A", 13 cuttable layers)."""
    cfg: VggConfig = [64, "M", 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    return make_vgg(cfg, **kwargs)


@register_model("vgg13_bn")
def vgg13_bn(**kwargs) -> Backbone:
    """VGG-13 with batch norm (config "B", 15 cuttable layers)."""
    cfg: VggConfig = [64, 64, "M", 128, 128, "M", 256, 256, "M", 512, 512, "M", 512, 512, "M"]
    return make_vgg(cfg, **kwargs)


@register_model("vgg16_bn")
def vgg16_bn(**kwargs) -> Backbone:
    """VGG-16 with batch norm (config "D", 18 cuttable layers)."""
    cfg: VggConfig = [64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M",
                      512, 512, 512, "M"]
    return make_vgg(cfg, **kwargs)
