"""Plug-in estimate of the I(x; z) upper bound on held-out features, in eval mode.

The figure CEM logs during training is computed on the training features that CEM itself
fits, so it falls by construction when CEM is on. This module computes the same bound
(:mod:`splitcem.cem.bounds`) the honest way round:

1. the deployed client (eval mode, no augmentation) encodes up to ``fit_limit`` training
   images; per class, k-means (K clusters) on these clean features fixes a partition;
2. the held-out (test) images are encoded the same way and assigned to the nearest
   centroid of their own class; per (class, cluster) the weights and the per-dimension
   second moments about the centroid are measured **on the held-out features only**;
3. ``I(x; z) <= h(z) bound - h(noise)``, with the bound of
   :func:`~splitcem.cem.bounds.feature_entropy_bound` (variances + sigma^2) and the stack's
   actual noise entropy (:meth:`~splitcem.defenses.DefenseStack.noise_entropy`).

The population inequality holds for any partition (DESIGN.md section 1 / the bounds module);
what comes out is a *plug-in estimate of that bound* from a finite sample: an estimate, not
a guarantee. For stacks the mixture does not model (top-k, dropout: what is sent is
filter(z) + noise) or without noise there is no figure, only the reason. The same partition
measured on the fitting (training) images is reported beside it, so the gap shows how much
of the training-time figure is fitted to the training set.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Protocol

import torch
from torch import Tensor

from splitcem.cem.bounds import feature_entropy_bound, nats_to_bits
from splitcem.cem.kmeans import batched_kmeans, cluster_stats, pad_by_class, sqdist
from splitcem.data import ArrayDataset, BatchLoader

if TYPE_CHECKING:
    from splitcem.config import RunConfig
    from splitcem.data import DataSplits
    from splitcem.defenses import DefenseStack
    from splitcem.models import SplitModel


class Prepared(Protocol):
    """A loaded, trained run (what :func:`splitcem.experiment.load_trained` returns; named
    structurally so that this module does not import the experiment that uses it)."""

    cfg: RunConfig
    splits: DataSplits
    model: SplitModel
    stack: DefenseStack
    device: torch.device

__all__ = ["ESTIMATE_NAME", "collect_features", "heldout_leakage", "mixture_leakage"]

#: how reports name the figure
ESTIMATE_NAME = "I(x;z) bound, plug-in estimate on held-out features (bits)"


@torch.no_grad()
def collect_features(
    client: torch.nn.Module, ds: ArrayDataset, *, device: torch.device, batch_size: int = 512,
    limit: int | None = None,
) -> tuple[Tensor, Tensor]:
    """Clean client features of ``ds`` in eval mode: ``(N, D)`` float32 and labels ``(N,)``."""
    if limit is not None and len(ds) > limit:
        ds = ds.subset(list(range(limit)))
    was = client.training
    client.eval()
    zs, ys = [], []
    try:
        for x, y in BatchLoader(ds, batch_size=batch_size, shuffle=False, augment=False,
                                device=device):
            zs.append(client(x).flatten(1).float())  # (B, D)
            ys.append(y)
    finally:
        client.train(was)
    return torch.cat(zs), torch.cat(ys).long()


def _assign(x: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid of the own class: (C, M, D), (C, K, D) -> (C, M)."""
    return sqdist(x, centroids).argmin(-1)


def mixture_leakage(
    z_fit: Tensor, y_fit: Tensor, z_eval: Tensor, y_eval: Tensor, *, num_classes: int,
    clusters: int, sigma: float, noise_entropy_per_dim: float, seed: int = 0,
) -> dict[str, float]:
    """The I(x; z) bound (bits) with the partition fitted on ``z_fit`` and the mixture
    statistics measured on ``z_eval`` (and, for comparison, on ``z_fit``).

    Args:
        z_fit, y_fit: (N, D) clean features and labels that fix the k-means partition.
        z_eval, y_eval: (M, D) held-out clean features and labels.
        sigma: Total std of the noise (its variance is added to each component's).
        noise_entropy_per_dim: The noise's entropy per feature in nats (subtracted).
    """
    d = z_fit.shape[1]
    x, mask = pad_by_class(z_fit.float(), y_fit, num_classes)  # (C, M, D), (C, M)
    gen = torch.Generator(device=z_fit.device).manual_seed(seed)
    res = batched_kmeans(x, mask, clusters, n_init=3, max_iter=50, tol=1e-3, generator=gen)
    out: dict[str, float] = {}
    for tag, z, y in (("heldout", z_eval, y_eval), ("fit", z_fit, y_fit)):
        xe, me = pad_by_class(z.float(), y, num_classes)
        pi, var, counts = cluster_stats(xe, me, res.centroids, _assign(xe, res.centroids))
        w = counts.sum(1)  # (C,) class frequencies of this set
        h_z = float(feature_entropy_bound(pi, var, w, sigma))
        mi = max(0.0, h_z - d * noise_entropy_per_dim)
        out[f"{tag}_bits"] = float(nats_to_bits(mi))
        out[f"{tag}_h_z_bound_nats"] = h_z
    out["noise_entropy_nats"] = d * noise_entropy_per_dim
    return out


def heldout_leakage(
    p: Prepared, *, clusters: int | None = None, fit_limit: int = 10000,
    heldout_limit: int | None = None, seed: int = 0,
) -> dict[str, Any]:
    """The held-out plug-in estimate for a loaded run (:func:`splitcem.experiment.load_trained`).

    Returns a JSON-ready record: ``heldout_bits`` (the figure to report), ``fit_bits`` (same
    partition, on the fitting images), ``note`` (why there is no figure, or what was
    assumed), and how it was computed.
    """
    ne = p.stack.noise_entropy()
    k = clusters or (p.cfg.cem.clusters if p.cfg.cem is not None else 5)
    rec: dict[str, Any] = {
        "estimate": "plug-in estimate of an upper bound on I(x;z) (not a guarantee)",
        "split": "test", "clusters": k, "eval_mode": True, "note": ne.note,
        "heldout_bits": None, "fit_bits": None,
    }
    if ne.per_dim is None:
        return rec
    zf, yf = collect_features(p.model.client, p.splits.train, device=p.device, limit=fit_limit)
    ze, ye = collect_features(p.model.client, p.splits.test, device=p.device,
                              limit=heldout_limit)
    if not (bool(torch.isfinite(zf).all()) and bool(torch.isfinite(ze).all())):
        rec["note"] = "non-finite client features: no estimate"
        return rec
    m = mixture_leakage(zf, yf, ze, ye, num_classes=p.splits.train.info.num_classes,
                        clusters=k, sigma=p.stack.noise_sigma, noise_entropy_per_dim=ne.per_dim,
                        seed=seed)
    rec.update(m)
    rec.update(fit_images=int(zf.shape[0]), heldout_images=int(ze.shape[0]),
               dim=int(zf.shape[1]))
    if not math.isfinite(rec["heldout_bits"]):
        rec["heldout_bits"] = None
    return rec
