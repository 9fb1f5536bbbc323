"""Datasets by name, caching, normalisation, augmentation, seeded splits and a batch loader.

Example:
    >>> from splitcem.data import make_splits, BatchLoader
    >>> splits = make_splits("fashion_mnist", limit_train=512, limit_test=256)
    >>> loader = BatchLoader(splits.train, batch_size=128, shuffle=True, augment=True,
    ...                      device="cpu")
    >>> loader.set_epoch(0); x, y = next(iter(loader))
    >>> tuple(x.shape), tuple(y.shape)
    ((128, 1, 28, 28), (128,))
"""

from splitcem.data.dataset import ArrayDataset
from splitcem.data.info import DatasetInfo
from splitcem.data.loader import BatchLoader
from splitcem.data.registry import list_datasets, load_dataset, register_dataset
from splitcem.data.splits import DataSplits, make_splits
from splitcem.data.transforms import Augment

__all__ = [
    "ArrayDataset",
    "Augment",
    "BatchLoader",
    "DataSplits",
    "DatasetInfo",
    "list_datasets",
    "load_dataset",
    "make_splits",
    "register_dataset",
]
