"""Conditional Entropy Maximisation (CEM): the maths, as pure functions.

Batched per-class k-means (:mod:`~splitcem.cem.kmeans`), the loss L_C in both forms
(:mod:`~splitcem.cem.loss`) and the entropy / leakage / MSE bounds (:mod:`~splitcem.cem.bounds`).
This package knows nothing of defenses or training: the defense named ``cem`` that banks
features, refits the mixture and adds ``lambda * L_C`` is :class:`splitcem.defenses.cem.CEM`.
See ``docs/cem.md``.
"""

from splitcem.cem.bounds import (
    feature_entropy_bound,
    gaussian_entropy,
    mixture_entropy_bound,
    mse_lower_bound,
    mutual_information_bound,
    noise_entropy,
)
from splitcem.cem.kmeans import (
    KMeansResult,
    batched_kmeans,
    cluster_stats,
    kmeans_plusplus,
    pad_by_class,
)
from splitcem.cem.loss import cem_loss, paper_loss, reference_loss, stored_terms

__all__ = [
    "KMeansResult",
    "batched_kmeans",
    "cem_loss",
    "cluster_stats",
    "feature_entropy_bound",
    "gaussian_entropy",
    "kmeans_plusplus",
    "mixture_entropy_bound",
    "mse_lower_bound",
    "mutual_information_bound",
    "noise_entropy",
    "pad_by_class",
    "paper_loss",
    "reference_loss",
    "stored_terms",
]
