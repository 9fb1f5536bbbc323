"""The CEM loss L_C, both forms, as pure functions of a batch and the fitted mixture.

Per batch (the plug-in estimate of the entropy bound's encoder-controlled term, docs/cem.md):

1. each sample is assigned to the nearest stored centroid *of its own class* (no gradient);
2. per (class, cluster) the batch estimate of the spread is the mean squared deviation of
   its samples from that stored centroid (as the reference does; it is defined for a single
   sample, has low variance with the ~2 samples a cluster gets per batch, and its gradient
   pulls each sample towards its centroid);
3. the batch estimate b is blended with the stored variance v of the cluster,
   ``v_mix = l b + (1 - l) v``, ``l = min(blend_scale * n / N, 0.99)``, n = samples of
   the cluster in the batch, N = samples of the cluster at the last fit (= pi_ck * L with L
   the samples of the class per epoch, the reference's formula);
4. the forms:

   * ``paper``: per class ``sum_k pi_ck * mean_d log(v_mix_ckd + sigma^2)`` (the term of the
     mixture entropy bound the encoder controls, divided by D), averaged over the classes
     present in the batch. Clusters of a present class without samples in the batch enter
     with their stored variance (a constant: the value stays an estimate of the bound term,
     the gradient is unchanged). With ``tau`` the per-dimension term becomes the hinge
     ``relu(log(v + sigma^2) - log(tau sigma^2 + sigma^2))``: a dimension stops being
     pushed once its variance is below ``tau * sigma^2``.
   * ``reference``: per present (class, cluster) a *scalar* variance (mean over the
     dimensions), ``pi_ck * relu(log(v_mix + gamma) - log(tau sigma^2 + gamma))`` with
     gamma = 0.01, summed over the present clusters and classes and divided by the number
     of classes present -- the live reference code, with ``pi`` and ``v`` taken from the
     sample's own class (the reference indexed them by a class counter into a per-sample
     table, i.e. from the wrong class).

Everything is one vectorised pass: segment sums with ``index_add`` over the flat
(class, cluster) index. With few classes (C * K <= B) the paper form then works on the
C * K cluster rows; otherwise (and always in the reference form) the sums are gathered back
to the samples and each sample's term is divided by its cluster's batch count, so summing
over samples sums over present clusters. Both layouts give one value and gradient. Samples
of classes without a fitted mixture (``fitted`` False) are ignored.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "REFERENCE_GAMMA",
    "assign_own_class",
    "cem_loss",
    "objective_from_stats",
    "paper_loss",
    "reference_loss",
    "stored_terms",
]

#: the constant the reference adds inside the logarithm of its hinge
REFERENCE_GAMMA = 0.01

Form = Literal["paper", "reference"]


@torch.no_grad()
def assign_own_class(z: Tensor, y: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid of each sample's own class: ``(B, D), (B,), (C, K, D) -> (B,)``."""
    mu = centroids[y]  # (B, K, D)
    # ||z - mu||^2 up to the per-sample constant ||z||^2: one bmm instead of a (B, K, D) diff
    cross = torch.bmm(mu, z.unsqueeze(-1)).squeeze(-1)  # (B, K)
    return (mu.pow(2).sum(-1) - 2.0 * cross).argmin(1)  # (B,)


def _segments(
    z: Tensor, y: Tensor, centroids: Tensor, counts: Tensor, fitted: Tensor, blend_scale: float
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Shared first half of both forms.

    Returns ``seg`` (B,) flat (class, cluster) index, ``cid`` (B,) the same segments
    renumbered 0..B-1 (so segment sums need only B rows, not C*K), ``dev`` (B, D) squared
    deviations from the own centroid (graph to z; 0 for ignored samples), ``n_i`` (B,)
    batch samples in each sample's cluster, ``n_seg`` (C*K,) batch samples per cluster,
    ``blend`` (B,) the weight l of each sample's cluster, ``present`` (C,) bool classes
    present in the batch.
    """
    c, k, d = centroids.shape
    b = z.shape[0]
    with torch.no_grad():
        valid = fitted[y].to(z.dtype)  # (B,)
        kk = assign_own_class(z.detach(), y, centroids)  # (B,)
        seg = y * k + kk  # (B,)
        # compact segment ids without a host sync (torch.unique would need one on a GPU):
        # sort, mark the first of each run, cumulative sum
        seg_sorted, order = seg.sort()
        first = torch.ones_like(seg_sorted, dtype=torch.bool)  # (B,)
        first[1:] = seg_sorted[1:] != seg_sorted[:-1]
        cid = torch.empty_like(seg)
        cid[order] = first.long().cumsum(0) - 1  # (B,) in [0, B)
        n_i = torch.zeros(b, dtype=z.dtype, device=z.device).index_add_(0, cid, valid)[cid]
        n_seg = torch.zeros(c * k, dtype=z.dtype, device=z.device).index_add_(0, seg, valid)
        present = torch.zeros(c, dtype=z.dtype, device=z.device).index_add_(0, y, valid) > 0
        fit_n = counts.reshape(c * k)[seg].to(z.dtype).clamp_min(1.0)  # (B,) N of the cluster
        blend = (blend_scale * n_i / fit_n).clamp_max(0.99)  # (B,)
    mu = centroids.reshape(c * k, d)[seg]  # (B, D) own centroid (a constant)
    dev = (z - mu).pow(2) * valid.unsqueeze(-1)  # (B, D) graph to z
    return seg, cid, dev, n_i, n_seg, blend, present


def paper_loss(
    z: Tensor,
    y: Tensor,
    *,
    centroids: Tensor,
    pi: Tensor,
    var: Tensor,
    counts: Tensor,
    fitted: Tensor,
    sigma: float,
    tau: float | None = None,
    blend_scale: float = 10.0,
    stored_terms: Tensor | None = None,
) -> Tensor:
    """``paper`` form of L_C (see the module docstring); a scalar with a graph to ``z``.

    Args:
        z: (B, D) clean features (flattened), graph to the encoder.
        y: (B,) labels.
        centroids: (C, K, D); pi: (C, K); var: (C, K, D); counts: (C, K) samples per
            cluster at the fit; fitted: (C,) bool.
        sigma: Std of the noise added to the features (> 0).
        tau: Optional hinge threshold, as a multiple of sigma^2.
        blend_scale: The 10 in ``l = min(10 n / N, 0.99)``.
        stored_terms: Optional precomputed :func:`stored_terms` (C, K) of ``var`` for the
            clusters absent from the batch (saves a log over (C, K, D) per step).

    The mixture statistics are constants of the step (detached here): the gradient reaches
    ``z`` only.
    """
    if not sigma > 0:
        raise ValueError(f"the paper form needs sigma > 0, got {sigma!r}")
    centroids, pi, var = centroids.detach(), pi.detach(), var.detach()
    if stored_terms is not None:
        stored_terms = stored_terms.detach()
    c, k = centroids.shape[:2]
    s2 = float(sigma) ** 2
    if c * k <= z.shape[0]:
        return _paper_loss_per_cluster(z, y, centroids, pi, var, counts, fitted, s2, tau,
                                       blend_scale)
    return _paper_loss_per_sample(z, y, centroids, pi, var, counts, fitted, s2, tau,
                                  blend_scale, stored_terms)


def _paper_loss_per_sample(
    z: Tensor, y: Tensor, centroids: Tensor, pi: Tensor, var: Tensor, counts: Tensor,
    fitted: Tensor, s2: float, tau: float | None, blend_scale: float,
    stored_terms: Tensor | None,
) -> Tensor:
    """The paper form over the B samples: segment sums over the clusters present in the
    batch (at most B rows), the absent clusters of present classes from ``stored_terms``.
    The layout for many classes (C*K > B), where per-cluster rows would be mostly empty."""
    c, k, d = centroids.shape
    seg, cid, dev, n_i, n_seg, blend, present = _segments(
        z, y, centroids, counts, fitted, blend_scale
    )
    valid = n_i > 0  # (B,) samples of fitted classes (the others have n_i = 0, dev = 0)
    n_i = n_i.clamp_min(1.0)
    # per-dimension batch variance of the sample's cluster: segment sum, gathered back
    seg_sum = torch.zeros_like(dev).index_add_(0, cid, dev)  # (B, D) rows: compact segments
    b = seg_sum[cid] / n_i.unsqueeze(-1)  # (B, D)
    bl = blend.unsqueeze(-1)  # (B, 1)
    v_mix = bl * b + (1.0 - bl) * var.reshape(c * k, d)[seg]  # (B, D)
    t = _dim_term(v_mix, s2, tau)  # (B,)
    w = pi.reshape(c * k)[seg].to(t.dtype)  # (B,)
    batch_part = (w * t * valid / n_i).sum()
    if stored_terms is None:
        stored_terms = _dim_term(var, s2, tau)  # (C, K)
    absent = present.unsqueeze(1) & (n_seg.view(c, k) == 0)  # (C, K) clusters of present classes
    stored_part = (pi * stored_terms * absent).sum()
    n_present = present.sum().clamp_min(1)
    return (batch_part + stored_part) / n_present


def _paper_loss_per_cluster(
    z: Tensor, y: Tensor, centroids: Tensor, pi: Tensor, var: Tensor, counts: Tensor,
    fitted: Tensor, s2: float, tau: float | None, blend_scale: float,
) -> Tensor:
    """The paper form computed on the C*K clusters instead of the B samples (C*K <= B).

    Same value and gradient as the per-sample path: a cluster without batch samples has
    blend weight 0, so its mixed variance is its stored one and its term is the stored term.
    Few classes (CIFAR-10: 50 clusters for 128 samples) make this the cheaper layout: the
    (B, K, D) gather of the own-class centroids becomes one (B, D) x (D, C*K) product, and
    the elementwise work runs over C*K rows with no sort or gather back to the samples.
    """
    c, k, d = centroids.shape
    flat = centroids.reshape(c * k, d)  # (CK, D)
    with torch.no_grad():
        valid = fitted[y].to(z.dtype)  # (B,)
        # squared distance up to the per-sample ||z||^2, own class's K columns only
        scores = flat.pow(2).sum(-1) - 2.0 * (z.detach() @ flat.T)  # (B, CK)
        own = y.unsqueeze(1) * k + torch.arange(k, device=y.device)  # (B, K)
        seg = own.gather(1, scores.gather(1, own).argmin(1, keepdim=True)).squeeze(1)  # (B,)
        n_seg = torch.zeros(c * k, dtype=z.dtype, device=z.device).index_add_(0, seg, valid)
        present = torch.zeros(c, dtype=z.dtype, device=z.device).index_add_(0, y, valid) > 0
        fit_n = counts.reshape(c * k).to(z.dtype).clamp_min(1.0)  # (CK,)
        blend = (blend_scale * n_seg / fit_n).clamp_max(0.99).unsqueeze(-1)  # (CK, 1)
        inv_n = (1.0 / n_seg.clamp_min(1.0)).unsqueeze(-1)  # (CK, 1)
    dev = (z - flat[seg]).pow(2) * valid.unsqueeze(-1)  # (B, D) graph to z
    b = torch.zeros(c * k, d, dtype=z.dtype, device=z.device).index_add_(0, seg, dev)  # sums
    v_mix = (blend * inv_n) * b + (1.0 - blend) * var.reshape(c * k, d)  # (CK, D)
    t = _dim_term(v_mix, s2, tau).view(c, k)  # (C, K)
    per_class = (pi.to(t.dtype) * t).sum(1)  # (C,)
    return (per_class * present).sum() / present.sum().clamp_min(1)


def _dim_term(v: Tensor, s2: float, tau: float | None) -> Tensor:
    """``mean_d log(v + sigma^2)`` (or its hinge at tau sigma^2): ``(..., D) -> (...)``."""
    t = torch.log(v + s2)
    if tau is not None:
        t = torch.relu(t - math.log(tau * s2 + s2))
    return t.mean(-1)


def stored_terms(var: Tensor, sigma: float, tau: float | None = None) -> Tensor:
    """The paper form's per-cluster term of stored variances, ``mean_d log(v + sigma^2)``
    (hinged with ``tau``): ``(C, K, D) -> (C, K)``. Pass it to :func:`paper_loss` as
    ``stored_terms`` to save a log over (C, K, D) per step while the mixture is unchanged."""
    return _dim_term(var, float(sigma) ** 2, tau)


def reference_loss(
    z: Tensor,
    y: Tensor,
    *,
    centroids: Tensor,
    pi: Tensor,
    var: Tensor,
    counts: Tensor,
    fitted: Tensor,
    sigma: float,
    tau: float = 0.125,
    blend_scale: float = 10.0,
    gamma: float = REFERENCE_GAMMA,
) -> Tensor:
    """``reference`` form of L_C (scalar variances, hinge; see the module docstring).

    Arguments as :func:`paper_loss`; ``var`` is (C, K, D) (its mean over D is the stored
    scalar variance) or already (C, K). As there, the gradient reaches ``z`` only.
    """
    centroids, pi, var = centroids.detach(), pi.detach(), var.detach()
    c, k, d = centroids.shape
    seg, cid, dev, n_i, _n_seg, blend, present = _segments(
        z, y, centroids, counts, fitted, blend_scale
    )
    valid = n_i > 0  # (B,) samples of fitted classes
    n_i = n_i.clamp_min(1.0)
    # scalar batch variance per cluster: mean over its samples and all dimensions
    seg_sum = torch.zeros_like(n_i).index_add_(0, cid, dev.sum(-1))  # (B,) compact segments
    b = seg_sum[cid] / (n_i * d)  # (B,)
    v_ref = var.mean(-1) if var.dim() == 3 else var  # (C, K)
    v_mix = blend * b + (1.0 - blend) * v_ref.reshape(c * k)[seg]  # (B,)
    threshold = math.log(tau * float(sigma) ** 2 + gamma)
    t = torch.relu(torch.log(v_mix + gamma) - threshold)  # (B,)
    w = pi.reshape(c * k)[seg].to(t.dtype)
    return (w * t * valid / n_i).sum() / present.sum().clamp_min(1)


def cem_loss(
    z: Tensor,
    y: Tensor,
    *,
    form: Form,
    centroids: Tensor,
    pi: Tensor,
    var: Tensor,
    counts: Tensor,
    fitted: Tensor,
    sigma: float,
    tau: float | None = None,
    blend_scale: float = 10.0,
    stored_terms: Tensor | None = None,
) -> Tensor:
    """Dispatch to :func:`paper_loss` or :func:`reference_loss` (``tau=None`` -> 0.125 there).

    ``z`` may be (B, C, H, W); it is flattened. Computed in float32 at least.
    """
    z = z.flatten(1)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    if form == "paper":
        return paper_loss(z, y, centroids=centroids, pi=pi, var=var, counts=counts,
                          fitted=fitted, sigma=sigma, blend_scale=blend_scale, tau=tau,
                          stored_terms=stored_terms)
    if form == "reference":
        return reference_loss(z, y, centroids=centroids, pi=pi, var=var, counts=counts,
                              fitted=fitted, sigma=sigma, blend_scale=blend_scale,
                              tau=0.125 if tau is None else tau)
    raise ValueError(f"unknown CEM form {form!r}; use 'paper' or 'reference'")


def objective_from_stats(
    pi: Tensor, var: Tensor, sigma: float, *, form: Form, tau: float | None, class_mask: Tensor
) -> Tensor:
    """L_C evaluated on fitted statistics alone (a whole-bank "batch" with l = 1).

    ``paper``: mean over the classes in ``class_mask`` (C,) of ``sum_k pi_ck mean_d
    log(v_ckd + sigma^2)`` (hinged with ``tau``); ``reference``: the same classes, scalar
    variances and the gamma hinge. Used for the per-epoch ``l_c`` metric.
    """
    s2 = float(sigma) ** 2
    if form == "paper":
        per = (pi * _dim_term(var, s2, tau)).sum(-1)  # (C,)
    else:
        t = 0.125 if tau is None else tau
        per = (
            pi
            * torch.relu(
                torch.log(var.mean(-1) + REFERENCE_GAMMA) - math.log(t * s2 + REFERENCE_GAMMA)
            )
        ).sum(-1)  # (C,)
    m = class_mask.to(per.dtype)
    return (per * m).sum() / m.sum().clamp_min(1)
