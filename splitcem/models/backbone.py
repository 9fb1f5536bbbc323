"""The uncut network every architecture builds: a list of cuttable layers plus a head.

Architectures (``vgg.py``, ``resnet.py``) only describe a plain classifier as a sequence of
*layers* (the units a ``cut`` counts) and a classifier head, recording each layer's output
channels and spatial size. ``split.py`` then cuts such a network into client and server
without knowing which architecture it is. Keeping the two apart is what lets one split
(bottleneck, activation, widths) serve every architecture.
"""

from __future__ import annotations

from collections.abc import Sequence

from torch import Tensor, nn

__all__ = ["Backbone", "init_weights", "scale_channels"]


def scale_channels(channels: int, width: float) -> int:
    """``channels * width`` rounded to an int, at least 1 (the width multiplier's rule)."""
    return max(1, round(channels * width))


def init_weights(m: nn.Module) -> None:
    """Reference initialisation; deterministic under ``torch.manual_seed``.

    Kaiming normal (fan_out, relu) for convolutions, BN weight 1 / bias 0, Linear N(0, 0.01)
    with bias 0. Apply with ``module.apply(init_weights)``.
    """
    if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
        nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
        if m.bias is not None:
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.modules.batchnorm._BatchNorm):
        if m.weight is not None:
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
    elif isinstance(m, nn.Linear):
        nn.init.normal_(m.weight, 0.0, 0.01)
        if m.bias is not None:
            nn.init.zeros_(m.bias)


class Backbone(nn.Module):
    """A plain classifier: ``head(layers[-1](...layers[0](x)))``.

    Args:
        layers: The cuttable layers, in order. A split with ``cut=k`` gives ``layers[:k]`` to
            the client and ``layers[k:]`` plus ``head`` to the server.
        channels: Output channels of each layer.
        sizes: Output spatial size (square maps) of each layer.
        names: A short human-readable name per layer ("conv64", "pool", "block2.1"), used in
            error messages and ``describe()``.
        head: Maps the last layer's output (B, C, H, W) to logits (B, num_classes).
        in_channels: Input channels.
        image_size: Input height = width.
    """

    def __init__(
        self,
        layers: Sequence[nn.Module],
        *,
        channels: Sequence[int],
        sizes: Sequence[int],
        names: Sequence[str],
        head: nn.Module,
        in_channels: int,
        image_size: int,
    ) -> None:
        super().__init__()
        if not len(layers) == len(channels) == len(sizes) == len(names):
            raise ValueError("layers, channels, sizes and names must have the same length")
        self.layers = nn.ModuleList(layers)
        self.channels = tuple(int(c) for c in channels)
        self.sizes = tuple(int(s) for s in sizes)
        self.names = tuple(names)
        self.head = head
        self.in_channels = in_channels
        self.image_size = image_size
        self.apply(init_weights)

    def __len__(self) -> int:
        return len(self.layers)

    def describe(self) -> str:
        """One line per layer: index (the cut that ends after it), name, output shape."""
        return "\n".join(
            f"{i + 1:>3} {n:<12} -> {c} x {s} x {s}"
            for i, (n, c, s) in enumerate(zip(self.names, self.channels, self.sizes, strict=True))
        )

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, num_classes)
        for layer in self.layers:
            x = layer(x)
        return self.head(x)
