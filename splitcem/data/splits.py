"""Seeded splits: the client's training set and the attacker's auxiliary / evaluation sets."""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from splitcem.data.dataset import ArrayDataset
from splitcem.data.registry import PathLike, load_dataset
from splitcem.errors import ConfigError

__all__ = ["DataSplits", "make_splits", "split_aux", "stratified_subset"]


@dataclass
class DataSplits:
    """The four sets a run uses.

    Attributes:
        train: The client's training set.
        aux: The attacker's auxiliary set (``aux_fraction`` of ``test``).
        eval: Held-out images the attack is scored on (the rest of ``test``).
        test: The (possibly limited) test set; accuracy is measured on it.
    """

    train: ArrayDataset
    aux: ArrayDataset
    eval: ArrayDataset
    test: ArrayDataset


def stratified_subset(labels: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Sorted indices of ``n`` rows drawn at random with classes as balanced as possible.

    A random permutation is reordered by each row's rank within its class, so the first
    ``n`` rows take one image of every class before a second of any.
    """
    n = min(n, len(labels))
    perm = rng.permutation(len(labels))
    lab = labels[perm]
    order = np.argsort(lab, kind="stable")
    rank = np.empty(len(lab), np.int64)
    starts = np.searchsorted(lab[order], lab[order])  # first position of each row's class
    rank[order] = np.arange(len(lab)) - starts
    chosen = perm[np.lexsort((np.arange(len(lab)), rank))[:n]]
    return np.sort(chosen)


def make_splits(name: str, *, root: PathLike = None, seed: int = 125, aux_fraction: float = 0.9,
                limit_train: int | None = None, limit_test: int | None = None,
                cache_dir: PathLike = None, image_size: int | None = None,
                split_seed: int | None = None) -> DataSplits:
    """Load ``name`` and split it; the result is a pure function of the data and the seeds.

    ``limit_train`` / ``limit_test`` keep a seeded class-stratified subset (for CPU runs);
    ``aux`` / ``eval`` are a seeded ``aux_fraction`` / rest partition of the kept test set
    (the paper's inference-time threat model: the attacker trains on 90% of the test set),
    drawn from ``split_seed`` (``None``: from ``seed``).

    Example:
        >>> s = make_splits("fashion_mnist", limit_train=512, limit_test=256)
        >>> len(s.train), len(s.aux), len(s.eval)
        (512, 230, 26)
    """
    if not 0.0 < aux_fraction < 1.0:
        raise ConfigError(f"aux_fraction must lie in (0, 1), got {aux_fraction}")
    for k, v in (("limit_train", limit_train), ("limit_test", limit_test)):
        if v is not None and v <= 0:
            raise ConfigError(f"{k} must be positive or None, got {v}")
    train = load_dataset(name, "train", root=root, cache_dir=cache_dir, image_size=image_size)
    test = load_dataset(name, "test", root=root, cache_dir=cache_dir, image_size=image_size)
    # Independent streams per use, so changing one limit does not reshuffle the others.
    if limit_train is not None and limit_train < len(train):
        train = train.subset(stratified_subset(train.labels, limit_train,
                                               np.random.default_rng([seed, 1])))
    if limit_test is not None and limit_test < len(test):
        test = test.subset(stratified_subset(test.labels, limit_test,
                                             np.random.default_rng([seed, 2])))
    aux, held = split_aux(test, seed=seed if split_seed is None else split_seed,
                          aux_fraction=aux_fraction)
    return DataSplits(train=train, aux=aux, eval=held, test=test)


def split_aux(test: ArrayDataset, *, seed: int = 125, aux_fraction: float = 0.9
              ) -> tuple[ArrayDataset, ArrayDataset]:
    """The seeded (aux, eval) partition of ``test`` that :func:`make_splits` makes (the
    inference-time attacker learns from ``aux`` and is scored on ``eval``)."""
    if not 0.0 < aux_fraction < 1.0:
        raise ConfigError(f"aux_fraction must lie in (0, 1), got {aux_fraction}")
    perm = np.random.default_rng([seed, 3]).permutation(len(test))
    n_aux = math.floor(len(test) * aux_fraction + 1e-9)
    return test.subset(np.sort(perm[:n_aux])), test.subset(np.sort(perm[n_aux:]))
