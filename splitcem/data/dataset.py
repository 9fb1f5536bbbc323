"""In-memory datasets: decoded uint8 images plus int64 labels."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from splitcem.data.info import DatasetInfo
from splitcem.errors import DataError

__all__ = ["ArrayDataset"]


@dataclass
class ArrayDataset:
    """A whole split held as arrays (small enough for memory at the paper's scales).

    Args:
        images: uint8 array (N, H, W, C), H == W == ``info.image_size``.
        labels: int64 array (N,) with values in [0, ``info.num_classes``).
        info: Normalisation constants and class names.
    """

    images: np.ndarray
    labels: np.ndarray
    info: DatasetInfo

    def __post_init__(self) -> None:
        im, lb, info = self.images, self.labels, self.info
        if not isinstance(im, np.ndarray) or im.dtype != np.uint8 or im.ndim != 4:
            raise DataError(
                f"{info.name}: images must be a uint8 array (N, H, W, C), got "
                f"{type(im).__name__} {getattr(im, 'dtype', '?')} {getattr(im, 'shape', '?')}"
            )
        want = (info.image_size, info.image_size, info.channels)
        if im.shape[1:] != want:
            raise DataError(f"{info.name}: images have shape (N, H, W, C) = {im.shape}, "
                            f"info says (N, {want[0]}, {want[1]}, {want[2]})")
        if not isinstance(lb, np.ndarray) or lb.dtype != np.int64 or lb.ndim != 1:
            raise DataError(
                f"{info.name}: labels must be an int64 array (N,), got "
                f"{type(lb).__name__} {getattr(lb, 'dtype', '?')} {getattr(lb, 'shape', '?')}"
            )
        if len(lb) != len(im):
            raise DataError(f"{info.name}: {len(im)} images but {len(lb)} labels")
        if len(lb) and (lb.min() < 0 or lb.max() >= info.num_classes):
            raise DataError(f"{info.name}: labels must lie in [0, {info.num_classes}), "
                            f"found [{lb.min()}, {lb.max()}]")

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, indices: np.ndarray | list[int]) -> ArrayDataset:
        """A new dataset holding the rows ``indices`` (copied, in that order; or a bool mask)."""
        idx = np.asarray(indices)
        idx = np.flatnonzero(idx) if idx.dtype == bool else idx.astype(np.int64)
        return ArrayDataset(self.images[idx], self.labels[idx], self.info)

    def class_counts(self) -> np.ndarray:
        """Number of images per class, (num_classes,) int64."""
        return np.bincount(self.labels, minlength=self.info.num_classes).astype(np.int64)
