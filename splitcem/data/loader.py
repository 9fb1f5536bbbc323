"""A loader that keeps the whole dataset as one uint8 tensor on the device.

At these sizes (CIFAR-10 train is 150 MB as uint8) moving the data once and indexing it
beats a ``DataLoader`` with workers: a batch is one ``index_select``, one cast and one
batched augmentation, with no host-to-device copy per step and no worker processes.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
from torch import Tensor

from splitcem.data.dataset import ArrayDataset
from splitcem.data.transforms import Augment

__all__ = ["BatchLoader", "epoch_generator"]


def epoch_generator(seed: int, epoch: int) -> torch.Generator:
    """A CPU generator whose stream is a pure function of ``(seed, epoch)``."""
    state = np.random.SeedSequence([seed, epoch]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed((int(state[0]) << 31) ^ int(state[1]))


class BatchLoader:
    """Yields ``(x, y)``: normalised float32 (B, C, H, W) and int64 (B,) on ``device``.

    Order and augmentation depend only on ``(seed, epoch)``: call ``set_epoch(e)`` before
    iterating epoch ``e`` (a resumed run then sees the same batches); ``set_epoch(e,
    start=k)`` yields that epoch's batches from the k-th on, each the same as in a full pass
    (a run resumed mid-epoch). Each iteration also advances the epoch by one, so forgetting
    ``set_epoch`` does not repeat epoch 0.

    Args:
        ds: The dataset; its images are copied to ``device`` once.
        batch_size: Images per batch.
        shuffle: Random order per epoch (else dataset order).
        augment: True for the default :class:`Augment`, False / None for none, or an
            :class:`Augment` instance.
        device: Where batches live ("cpu", "cuda", torch.device, ...).
        seed: Base seed of order and augmentation.
        drop_last: Drop a final partial batch.

    Example:
        >>> from splitcem.data import load_dataset
        >>> ds = load_dataset("fashion_mnist", "test")
        >>> loader = BatchLoader(ds, batch_size=128, shuffle=True, augment=True,
        ...                      device="cpu")
        >>> loader.set_epoch(0); x, y = next(iter(loader))
        >>> x.dtype, y.dtype, len(loader)
        (torch.float32, torch.int64, 79)
    """

    def __init__(self, ds: ArrayDataset, *, batch_size: int, shuffle: bool,
                 augment: bool | Augment | None, device: str | torch.device,
                 seed: int = 0, drop_last: bool = False) -> None:
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.dataset = ds
        self.info = ds.info
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.augment = Augment() if augment is True else (augment or None)
        self.device = torch.device(device)
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = 0
        self._start = 0  # the first batch the next iteration yields (set_epoch's start)
        # (N, H, W, C) uint8, moved once; on the CPU this shares the array's memory (no copy),
        # so building a loader per evaluation is free. Batches are made channels-first below.
        arr = np.ascontiguousarray(ds.images)
        self._images = torch.from_numpy(arr if arr.flags.writeable else arr.copy()).to(
            self.device)
        self._labels = torch.from_numpy(ds.labels).to(self.device)
        std = torch.tensor(ds.info.std, dtype=torch.float32, device=self.device)
        mean = torch.tensor(ds.info.mean, dtype=torch.float32, device=self.device)
        self._scale = (1.0 / (255.0 * std)).view(1, -1, 1, 1)  # uint8 -> normalised in one FMA
        self._shift = (-mean / std).view(1, -1, 1, 1)

    def set_epoch(self, epoch: int, *, start: int = 0) -> None:
        """Select the epoch whose order and augmentation the next iteration produces, and
        the batch it starts from (``0 <= start <= len(self)``; the ones before are skipped)."""
        if not 0 <= start <= len(self):
            raise ValueError(f"start must be in [0, {len(self)}], got {start}")
        self.epoch, self._start = int(epoch), int(start)

    def __len__(self) -> int:
        n = len(self.dataset)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        g = epoch_generator(self.seed, self.epoch)
        start, self._start = self._start, 0
        self.epoch += 1
        n = len(self.dataset)
        order = torch.randperm(n, generator=g) if self.shuffle else torch.arange(n)
        order = order.to(self.device)
        aug = self.augment if self.augment is not None and self.augment.active else None
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            if i < start:  # skipped: draw its augmentation all the same (the stream stays)
                if aug is not None:
                    aug.sample(len(idx), g)
                continue
            x = self._images.index_select(0, idx).permute(0, 3, 1, 2).to(
                torch.float32, memory_format=torch.contiguous_format)  # (B, C, H, W), 0..255
            if aug is not None:
                x = aug.apply(x.mul_(1.0 / 255.0), aug.sample(len(idx), g)).mul_(255.0)
            yield torch.addcmul(self._shift, x, self._scale), self._labels.index_select(0, idx)
