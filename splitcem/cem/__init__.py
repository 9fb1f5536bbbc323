"""Conditional Entropy Maximisation (CEM): batched k-means, entropy bounds, the regulariser.

Importing this package registers the defense ``cem`` (:class:`CEM`). See ``docs/cem.md``.
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
from splitcem.cem.loss import cem_loss, paper_loss, reference_loss
from splitcem.cem.regularizer import CEM

__all__ = [
    "CEM",
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
]
