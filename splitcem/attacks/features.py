"""The images and training features of the learning attacks: batches, and encoding once.

A decoder attack trains on (features, image) pairs of its auxiliary set. The features are
what the attacker gets for an image, ``transform(encode(x))``: a deterministic encoder (the
client in eval mode) followed by the defense's transform with fresh randomness. The
reference path computes both for every batch of every epoch; since the encoder is frozen,
its output for an image never changes, so :class:`FeatureCache` computes it once per image
(and once per mirror image when the attack flips its images) and every step applies only
the transform, afresh. The decoder then sees the same inputs, drawn from the same random
stream in the same order, as on the reference path (tested), at a fraction of the cost.

The query-access ``decoder`` uses this too: ``target.observe(x)`` *is*
``target.transform(target.clean(x))`` (:class:`~splitcem.attacks.target.AttackTarget`), so
the cache computes exactly the answers its queries would return; nothing else reaches the
decoder.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from splitcem.data.dataset import ArrayDataset

__all__ = [
    "CACHE_LIMIT_BYTES",
    "ENCODE_CHOICES",
    "FeatureCache",
    "ImageBank",
    "SplitFeatures",
    "cache_refusal",
    "images_to_device",
    "index_batches",
    "iterate_images",
]

#: ``encode`` settings of the decoder attacks: "once" (cached clean features) or the
#: reference, "every_epoch" (the encoder runs on every batch of every epoch)
ENCODE_CHOICES: tuple[str, ...] = ("once", "every_epoch")

#: the largest feature cache kept (bytes); a larger one re-encodes every epoch instead
CACHE_LIMIT_BYTES = 4 * 2**30


def images_to_device(ds: ArrayDataset, device: torch.device) -> Tensor:
    """(N, H, W, C) uint8 images of ``ds`` as one tensor on ``device``."""
    return torch.from_numpy(np.ascontiguousarray(ds.images)).to(device)


def index_batches(n: int, batch_size: int, *, device: torch.device, shuffle: bool = False,
                  generator: torch.Generator | None = None) -> Iterator[Tensor]:
    """Indices (B,) of consecutive batches over ``n`` items, in a random order (drawn from
    ``generator``) with ``shuffle``; the last batch may be smaller."""
    order = (torch.randperm(n, generator=generator).to(device) if shuffle
             else torch.arange(n, device=device))
    for i in range(0, n, batch_size):
        yield order[i:i + batch_size]


class ImageBank:
    """A dataset's uint8 images on a device (moved once, 4x less than float), converted
    per batch there: ``bank.batch(idx)`` -> (x_norm, x01), float32 (B, C, H, W)."""

    def __init__(self, ds: ArrayDataset, device: torch.device,
                 uint8_on_device: Tensor | None = None) -> None:
        self.images = (uint8_on_device if uint8_on_device is not None
                       else images_to_device(ds, device))
        self.mean = torch.tensor(ds.info.mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(ds.info.std, device=device).view(1, -1, 1, 1)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def batch(self, idx: Tensor) -> tuple[Tensor, Tensor]:
        x01 = self.images[idx].permute(0, 3, 1, 2).float().div_(255)  # (B, C, H, W)
        return (x01 - self.mean) / self.std, x01


def iterate_images(
    ds: ArrayDataset,
    *,
    batch_size: int,
    device: torch.device,
    shuffle: bool = False,
    generator: torch.Generator | None = None,
    uint8_on_device: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor]]:
    """Yield (x_norm, x01) float32 (B, C, H, W) batches of ``ds`` on ``device``.

    The whole uint8 array is moved to the device once (pass it back in through
    ``uint8_on_device`` to reuse it across epochs). No augmentation here: metrics need the
    exact images (decoder training can mirror its own batches, ``flip``).
    """
    bank = ImageBank(ds, device, uint8_on_device)
    for idx in index_batches(len(bank), batch_size, device=device, shuffle=shuffle,
                             generator=generator):
        yield bank.batch(idx)


@dataclass(frozen=True)
class SplitFeatures:
    """An attacker's features as ``transform(encode(x))``: ``encode`` deterministic
    (normalised images (B, C, H, W) -> clean features (B, Cz, Hz, Wz), cacheable),
    ``transform`` the random part, applied afresh on every call ((B, ...) -> (K * B, ...)
    for K draws per image)."""

    encode: Callable[[Tensor], Tensor]
    transform: Callable[[Tensor], Tensor]


class FeatureCache:
    """``encode(x)`` of every image of a bank, computed once (and of every mirror image
    with ``flip``): ``gather(idx, mirrored)`` returns the features of a batch as the
    reference path would compute them from the (partly mirrored) images."""

    def __init__(self, plain: Tensor, mirrored: Tensor | None) -> None:
        self.plain, self.mirrored = plain, mirrored

    @classmethod
    @torch.no_grad()
    def build(cls, bank: ImageBank, encode: Callable[[Tensor], Tensor], *, flip: bool,
              batch_size: int) -> FeatureCache:
        """Encode the bank's images in order, in batches of ``batch_size``."""
        device = bank.images.device
        variants: list[Tensor] = []
        for mirror in ([False, True] if flip else [False]):
            parts = []
            for idx in index_batches(len(bank), batch_size, device=device):
                x, _ = bank.batch(idx)
                parts.append(encode(x.flip(-1) if mirror else x))
            variants.append(torch.cat(parts))
        return cls(variants[0], variants[1] if flip else None)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.plain, self.mirrored)
                   if t is not None)

    def gather(self, idx: Tensor, mirrored: Tensor | None = None) -> Tensor:
        """Features of images ``idx`` (B,); ``mirrored`` (B, 1, 1, 1) bool picks the mirror
        image's features where true (needs ``flip``)."""
        z = self.plain[idx]
        if mirrored is None:
            return z
        if self.mirrored is None:
            raise ValueError("this cache holds no mirror images; build it with flip=True")
        return torch.where(mirrored, self.mirrored[idx], z)


def cache_refusal(aux: ArrayDataset, device: torch.device, encode: Callable[[Tensor], Tensor],
                  feature_shape: tuple[int, ...], *, flip: bool) -> str | None:
    """Why the features of ``aux`` cannot be cached (None: they can): a cache over
    :data:`CACHE_LIMIT_BYTES`, or an encoder whose output for one input varies."""
    size = len(aux) * math.prod(feature_shape) * 4 * (2 if flip else 1)
    if size > CACHE_LIMIT_BYTES:
        return (f"the feature cache would take {size / 2**20:.0f} MiB (limit "
                f"{CACHE_LIMIT_BYTES / 2**20:.0f} MiB)")
    x, _ = next(iterate_images(aux.subset(list(range(min(2, len(aux))))), batch_size=2,
                               device=device))
    with torch.no_grad():
        if not torch.equal(encode(x), encode(x)):
            return "the encoder's output for one input varies between calls"
    return None
