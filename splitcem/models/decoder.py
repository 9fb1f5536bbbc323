"""The inversion decoder architecture: features back to images.

``ResDecoder`` is the paper's "res_normN8C64" attack network. It lives here, below both of
its users, because two packages build it: the attacks (``splitcem.attacks``) train it as the
attacker, and adversarial training (``splitcem.defenses.adversarial``) trains a small one as
the simulated attacker. Neither package needs to import the other for it.
"""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from splitcem._validate import check_int
from splitcem.errors import ConfigError

__all__ = ["ResBlock", "ResDecoder", "TargetShapes"]


class TargetShapes(Protocol):
    """What :meth:`ResDecoder.for_target` reads from an attack target (e.g.
    :class:`splitcem.attacks.AttackTarget`): feature and image shapes, and a device."""

    @property
    def feature_shape(self) -> tuple[int, ...]: ...

    @property
    def image_shape(self) -> tuple[int, int, int]: ...

    @property
    def device(self) -> torch.device: ...


class ResBlock(nn.Module):
    """Pre-activation residual block: BN-ReLU-conv3x3, BN-ReLU-conv3x3, plus a shortcut
    (1x1 conv when the channel count changes, identity otherwise)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.BatchNorm2d(cin), nn.ReLU(inplace=False), nn.Conv2d(cin, cout, 3, padding=1),
            nn.BatchNorm2d(cout), nn.ReLU(inplace=True), nn.Conv2d(cout, cout, 3, padding=1),
        )
        self.shortcut: nn.Module = nn.Identity() if cin == cout else nn.Conv2d(cin, cout, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, cin, H, W) -> (B, cout, H, W)
        return self.shortcut(x) + self.body(x)


class ResDecoder(nn.Module):
    """Features (B, C_z, s, s) -> images (B, C, S, S) in [0, 1] ("res_normN8C64").

    block(C_z -> width), ``depth`` x block(width -> width), one stride-2 transposed conv
    (3x3, padding 1, output_padding 1) + BN + ReLU per doubling of the resolution,
    block(width -> C), sigmoid. When S / s is not a power of two (7 -> 32), the last
    doubling that fits is followed by a bilinear resize to S before the output block, so
    the output block still smooths the resized map.

    Args:
        in_channels: C_z, feature channels.
        in_size: s, feature height = width.
        out_channels: C, image channels.
        out_size: S, image height = width.
        width: Channels of the hidden blocks (paper: 64).
        depth: Number of width -> width blocks (paper: 8).

    Example:
        >>> ResDecoder(8, 8, 3, 32, width=16, depth=1)(torch.rand(2, 8, 8, 8)).shape
        torch.Size([2, 3, 32, 32])
    """

    def __init__(self, in_channels: int, in_size: int, out_channels: int, out_size: int, *,
                 width: int = 64, depth: int = 8) -> None:
        super().__init__()
        for k, v in (("in_channels", in_channels), ("in_size", in_size),
                     ("out_channels", out_channels), ("out_size", out_size), ("width", width)):
            check_int(k, v, lo=1)
        check_int("decoder depth", depth, lo=0)
        self.out_size = out_size
        #: the constructor's arguments: ``ResDecoder(**decoder.config)`` rebuilds it
        self.config: dict[str, int] = dict(in_channels=in_channels, in_size=in_size,
                                           out_channels=out_channels, out_size=out_size,
                                           width=width, depth=depth)
        ups = 0
        while in_size * 2 ** (ups + 1) <= out_size:
            ups += 1
        self.resize = in_size * 2 ** ups != out_size
        layers: list[nn.Module] = [ResBlock(in_channels, width)]
        layers += [ResBlock(width, width) for _ in range(depth)]
        for _ in range(ups):
            layers += [nn.ConvTranspose2d(width, width, 3, stride=2, padding=1, output_padding=1),
                       nn.BatchNorm2d(width), nn.ReLU(inplace=True)]
        self.trunk = nn.Sequential(*layers)
        self.head = ResBlock(width, out_channels)

    def forward(self, z: Tensor) -> Tensor:
        h = self.trunk(z)  # (B, width, s * 2^ups, s * 2^ups)
        if self.resize:
            h = F.interpolate(h, size=(self.out_size, self.out_size), mode="bilinear",
                              align_corners=False)
        return torch.sigmoid(self.head(h))  # (B, C, S, S)

    @classmethod
    def for_target(cls, target: TargetShapes, *, width: int = 64, depth: int = 8) -> ResDecoder:
        """A decoder sized for ``target``'s feature and image shapes, on its device."""
        cz, hz, wz = target.feature_shape
        if hz != wz:
            raise ConfigError(f"ResDecoder needs square features, got {hz}x{wz}")
        c, s, _ = target.image_shape
        return cls(cz, hz, c, s, width=width, depth=depth).to(target.device)
