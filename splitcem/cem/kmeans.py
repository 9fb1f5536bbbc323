"""Batched k-means: K clusters in each of C classes at once, on the features' device.

CEM models the clean features of every class as a K-component mixture (weights, means and
diagonal variances from k-means on that class's features; docs/cem.md) and refits it every
epoch. The reference code ran one k-means per class in a Python loop with
a host sync per iteration; here all classes are fitted together:

* the samples are laid out per class as a padded tensor ``x`` (C, M, D) with a validity
  ``mask`` (C, M) (:func:`pad_by_class`), so every step is a batched matmul / reduction;
* seeding is greedy k-means++ (the scikit-learn variant: a few candidates per step, keep the
  one that lowers the potential most), batched over classes; it is sequential over the K
  seeds by definition, so there is a loop of K small batched steps;
* Lloyd iterations stop early once no assignment changes (or at most a fraction ``tol``);
  the check is a host sync, so it runs at iterations 1 and 2 (a warm start often converges
  there) and then every ``check_every`` iterations;
* clusters that lose all their points are re-seeded at the points farthest from their
  centroid (distinct points for several empty clusters of one class);
* a warm start (last epoch's centroids) replaces the seeding for the classes that have one;
  ``n_init`` restarts (best inertia kept) apply to the seeded classes only.

Nothing loops over classes or clusters in Python.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "KMeansResult",
    "batched_kmeans",
    "cluster_stats",
    "kmeans_plusplus",
    "pad_by_class",
    "sqdist",
]


@dataclass
class KMeansResult:
    """Output of :func:`batched_kmeans` (all tensors on the input's device)."""

    centroids: Tensor  # (C, K, D)
    assign: Tensor  # (C, M) cluster index of each point (arbitrary at padded positions)
    counts: Tensor  # (C, K) points per cluster (float)
    inertia: Tensor  # (C,) sum of squared distances of the valid points to their centroid
    n_iter: int  # centroid updates performed
    converged: bool  # True when the assignments stopped changing before max_iter


def pad_by_class(z: Tensor, y: Tensor, num_classes: int) -> tuple[Tensor, Tensor]:
    """Lay out flat samples per class: ``(N, D), (N,) -> x (C, M, D), mask (C, M)``.

    M is the size of the largest class; shorter classes are zero-padded and masked out.
    Samples keep their order within a class (a stable sort), so the result is deterministic.
    """
    if z.dim() != 2 or y.shape != z.shape[:1]:
        raise ValueError(f"expected z (N, D) and y (N,), got {tuple(z.shape)} and {tuple(y.shape)}")
    n, d = z.shape
    counts = torch.bincount(y, minlength=num_classes)  # (C,)
    if counts.numel() > num_classes:
        raise ValueError(f"labels must lie in [0, {num_classes}), got max {int(y.max())}")
    # host sync: the padded width M must be known on the host to allocate x
    m = int(counts.max()) if n else 0
    x = z.new_zeros(num_classes, m, d)  # (C, M, D)
    mask = torch.zeros(num_classes, m, dtype=torch.bool, device=z.device)  # (C, M)
    if n:
        order = torch.argsort(y, stable=True)  # (N,)
        starts = torch.cumsum(counts, 0) - counts  # (C,) first row of each class
        rank = torch.empty_like(y)
        rank[order] = torch.arange(n, device=z.device) - starts[y[order]]  # (N,) row in class
        x[y, rank] = z  # one scatter of the rows, no sorted copy of z
        mask[y, rank] = True
    return x, mask


def _sqdist(x: Tensor, c: Tensor, x_sq: Tensor | None = None) -> Tensor:
    """Squared Euclidean distances ``(C, M, D), (C, K, D) -> (C, M, K)`` via one bmm."""
    if x_sq is None:
        x_sq = _sq_norms(x)  # (C, M)
    c_sq = (c * c).sum(-1)  # (C, K)
    d = x_sq.unsqueeze(-1) + c_sq.unsqueeze(1) - 2.0 * torch.bmm(x, c.transpose(1, 2))
    return d.clamp_min_(0.0)  # (C, M, K); rounding can make tiny distances negative


#: the public name of the squared distances (the held-out leakage estimate assigns with it)
sqdist = _sqdist


def _sq_norms(x: Tensor) -> Tensor:
    """Squared norms along the last dim without materialising ``x * x`` (a copy of x)."""
    return torch.linalg.vector_norm(x, dim=-1).square()


def _gather_points(x: Tensor, idx: Tensor) -> Tensor:
    """``x (C, M, D)``, ``idx (C, J)`` -> the indexed points ``(C, J, D)``."""
    return x.gather(1, idx.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def kmeans_plusplus(
    x: Tensor,
    mask: Tensor,
    k: int,
    *,
    generator: torch.Generator | None = None,
    n_local_trials: int | None = None,
    x_sq: Tensor | None = None,
) -> Tensor:
    """Greedy k-means++ seeds for every class at once: ``(C, M, D), (C, M) -> (C, K, D)``.

    Each new seed is drawn with probability proportional to the squared distance to the
    nearest seed so far; ``n_local_trials`` candidates (default ``2 + log K``, as in
    scikit-learn) are drawn and the one that lowers the total potential most is kept.
    Classes without points get arbitrary (zero) seeds; callers mask them out.
    """
    c, m, d = x.shape
    if m == 0:
        return x.new_zeros(c, k, d)
    trials = n_local_trials or 2 + int(math.log(k))
    if x_sq is None:
        x_sq = _sq_norms(x)  # (C, M)
    valid = mask.to(x.dtype)  # (C, M)
    # a class without points draws uniformly among its padding (ignored by the caller)
    uniform = torch.where(mask.any(1, keepdim=True), valid, torch.ones_like(valid))  # (C, M)
    rows = torch.arange(c, device=x.device)
    seeds = x.new_empty(c, k, d)  # (C, K, D)
    first = torch.multinomial(uniform, 1, generator=generator)  # (C, 1)
    seeds[:, 0] = x[rows, first[:, 0]]
    closest = _sqdist(x, seeds[:, :1], x_sq).squeeze(-1) * valid  # (C, M)
    for j in range(1, k):  # sequential by definition; each step is batched over classes
        potential = closest.sum(1, keepdim=True)  # (C, 1)
        # all points already on a seed (or fewer distinct points than K): draw uniformly
        probs = torch.where(potential > 0, closest, uniform)  # (C, M)
        cand = torch.multinomial(probs, trials, replacement=True, generator=generator)  # (C, T)
        cand_x = _gather_points(x, cand)  # (C, T, D)
        new_closest = torch.minimum(closest.unsqueeze(-1), _sqdist(x, cand_x, x_sq))  # (C, M, T)
        new_closest = new_closest * valid.unsqueeze(-1)
        best = new_closest.sum(1).argmin(1)  # (C,) candidate with the lowest potential
        closest = new_closest[rows, :, best]  # (C, M)
        seeds[:, j] = cand_x[rows, best]
    return seeds


def batched_kmeans(
    x: Tensor,
    mask: Tensor | None = None,
    k: int = 5,
    *,
    init: Tensor | None = None,
    init_valid: Tensor | None = None,
    n_init: int = 1,
    max_iter: int = 50,
    tol: float = 0.0,
    check_every: int = 5,
    generator: torch.Generator | None = None,
    n_local_trials: int | None = None,
) -> KMeansResult:
    """Lloyd's k-means with K clusters in each of C classes, all classes at once.

    Args:
        x: Points per class, (C, M, D) (see :func:`pad_by_class`).
        mask: (C, M) bool, True for real points; ``None`` means all points are real.
        k: Clusters per class.
        init: Warm-start centroids (C, K, D); classes where ``init_valid`` (C,) is False
            (default: all True) are seeded with k-means++ instead.
        n_init: k-means++ restarts for the seeded (not warm-started) classes; each class
            keeps its run with the lowest inertia (scikit-learn's ``n_init``). The restarts
            loop over runs, each batched over the seeded classes.
        max_iter: Maximum number of centroid updates per run.
        tol: Stop once at most this fraction of the (real) points changed cluster since the
            previous iteration; 0 (default) waits for no change at all (the reference).
        check_every: Early-stop check period (each check is one host sync).
        generator: Random generator for the seeding (on ``x``'s device).
        n_local_trials: Candidates per k-means++ step (default ``2 + log K``).

    Returns:
        A :class:`KMeansResult`; its ``centroids`` and ``assign`` are consistent (the last
        step is an assignment to the returned centroids). ``n_iter`` is the largest number
        of updates of any run; ``converged`` holds if every kept run converged.

    Example:
        >>> g = torch.Generator().manual_seed(0)
        >>> x = torch.cat([torch.randn(1, 50, 2) * 0.1, torch.randn(1, 50, 2) * 0.1 + 5], 1)
        >>> res = batched_kmeans(x, k=2, generator=g)
        >>> sorted(res.counts[0].tolist())
        [50.0, 50.0]
    """
    if x.dim() != 3:
        raise ValueError(f"x must be (C, M, D), got shape {tuple(x.shape)}")
    if k < 1 or max_iter < 0 or check_every < 1 or n_init < 1 or not 0 <= tol < 1:
        raise ValueError(
            "need k >= 1, n_init >= 1, max_iter >= 0, 0 <= tol < 1, check_every >= 1; "
            f"got {k}, {n_init}, {max_iter}, {tol}, {check_every}"
        )
    c, m, d = x.shape
    if mask is None:
        mask = torch.ones(c, m, dtype=torch.bool, device=x.device)
    x_sq = _sq_norms(x)  # (C, M)

    cold: Tensor | None = None  # (C,) bool, classes seeded with k-means++
    if init is None:
        centroids = kmeans_plusplus(x, mask, k, x_sq=x_sq, generator=generator,
                                     n_local_trials=n_local_trials)
        cold = torch.ones(c, dtype=torch.bool, device=x.device)
    else:
        if init.shape != (c, k, d):
            raise ValueError(f"init must have shape {(c, k, d)}, got {tuple(init.shape)}")
        centroids = init.to(x.dtype).clone()
        # host sync (once): is any class without a warm start?
        if init_valid is not None and not bool(init_valid.all()):
            seeds = kmeans_plusplus(x, mask, k, x_sq=x_sq, generator=generator,
                                     n_local_trials=n_local_trials)
            centroids = torch.where(init_valid.view(c, 1, 1), centroids, seeds)
            cold = ~init_valid.to(torch.bool)
    res = _lloyd(x, mask, x_sq, centroids, max_iter, tol, check_every)

    if n_init > 1 and cold is not None:
        # restarts only for the seeded classes: a subset gathered once (host sync)
        idx = cold.nonzero().squeeze(1)  # (C',)
        xs, ms, sq = x[idx], mask[idx], x_sq[idx]
        for _ in range(n_init - 1):  # loop over runs, each batched over classes
            seeds = kmeans_plusplus(xs, ms, k, x_sq=sq, generator=generator,
                                     n_local_trials=n_local_trials)
            run = _lloyd(xs, ms, sq, seeds, max_iter, tol, check_every)
            better = run.inertia < res.inertia[idx]  # (C',)
            b1, b2 = better.view(-1, 1), better.view(-1, 1, 1)
            res.centroids[idx] = torch.where(b2, run.centroids, res.centroids[idx])
            res.assign[idx] = torch.where(b1, run.assign, res.assign[idx])
            res.counts[idx] = torch.where(b1, run.counts, res.counts[idx])
            res.inertia[idx] = torch.where(better, run.inertia, res.inertia[idx])
            res.n_iter = max(res.n_iter, run.n_iter)
            res.converged = res.converged and run.converged
    return res


def _lloyd(
    x: Tensor,
    mask: Tensor,
    x_sq: Tensor,
    centroids: Tensor,
    max_iter: int,
    tol: float,
    check_every: int,
) -> KMeansResult:
    """Lloyd iterations from ``centroids`` (C, K, D), with early stop and re-seeding."""
    m = x.shape[1]
    k = centroids.shape[1]
    valid = mask.to(x.dtype)  # (C, M)
    kk = min(k, m)  # farthest-point candidates available per class
    allowed = tol * mask.sum()  # () changed points tolerated (a device scalar: no sync)
    prev: Tensor | None = None
    n_iter = 0
    converged = False
    for it in range(max_iter + 1):
        dist = _sqdist(x, centroids, x_sq)  # (C, M, K)
        dmin, assign = dist.min(-1)  # (C, M)
        if it == max_iter:
            break  # final assignment to the last centroids
        check = prev is not None and (it <= 2 or it % check_every == 0)
        # host sync (only on check iterations): stop once (almost) no real point changed
        # cluster; with none changed, no centroid moves either: a fixed point
        if check and bool(((assign != prev) & mask).sum() <= allowed):
            converged = True
            break
        prev = assign
        onehot = F.one_hot(assign, k).to(x.dtype) * valid.unsqueeze(-1)  # (C, M, K)
        counts = onehot.sum(1)  # (C, K)
        sums = torch.bmm(onehot.transpose(1, 2), x)  # (C, K, D)
        means = sums / counts.clamp_min(1.0).unsqueeze(-1)  # (C, K, D)
        empty = counts == 0  # (C, K)
        if kk > 0:
            # re-seed the j-th empty cluster of a class at the j-th farthest point of that class
            far_d, far_i = torch.where(mask, dmin, -1.0).topk(kk, dim=1)  # (C, kk)
            slot = (empty.long().cumsum(1) - 1).clamp(0, kk - 1)  # (C, K)
            cand_d = far_d.gather(1, slot)  # (C, K)
            cand_x = _gather_points(x, far_i.gather(1, slot))  # (C, K, D)
            # only points not already sitting on a centroid; otherwise keep the old centroid
            reseed = empty & (cand_d > 0)
            means = torch.where(reseed.unsqueeze(-1), cand_x, means)
            empty = empty & ~reseed
        centroids = torch.where(empty.unsqueeze(-1), centroids, means)
        n_iter += 1

    counts = (F.one_hot(assign, k).to(x.dtype) * valid.unsqueeze(-1)).sum(1)  # (C, K)
    inertia = (dmin * valid).sum(1)  # (C,)
    return KMeansResult(centroids, assign, counts, inertia, n_iter, converged)


def cluster_stats(
    x: Tensor, mask: Tensor, centroids: Tensor, assign: Tensor, *, overwrite_x: bool = False
) -> tuple[Tensor, Tensor, Tensor]:
    """Mixture statistics of a clustering: weights, per-dimension variances and counts.

    Args:
        x: (C, M, D) points; mask: (C, M); centroids: (C, K, D); assign: (C, M).
        overwrite_x: Square ``x`` in place for the second moments instead of allocating a
            copy of its size (for callers whose ``x`` is scratch, like the CEM refit).

    Returns:
        ``pi`` (C, K): fraction of the class's points in each cluster (rows of classes
        without points are 0); ``var`` (C, K, D): mean squared deviation from the centroid
        per dimension (the maximum-likelihood diagonal covariance; 0 for empty or
        single-point clusters); ``counts`` (C, K) (float).
    """
    k = centroids.shape[1]
    onehot = F.one_hot(assign, k).to(x.dtype) * mask.to(x.dtype).unsqueeze(-1)  # (C, M, K)
    counts = onehot.sum(1)  # (C, K)
    oh_t = onehot.transpose(1, 2)  # (C, K, M)
    s1 = torch.bmm(oh_t, x)  # (C, K, D) sum of x
    sq = x.square_() if overwrite_x else x.square()  # (C, M, D)
    s2 = torch.bmm(oh_t, sq)  # (C, K, D) sum of x^2
    n = counts.unsqueeze(-1)  # (C, K, 1)
    # sum (x - c)^2 = s2 - 2 c s1 + n c^2, exact for any c; clamp the rounding below 0
    var = (s2 - 2.0 * centroids * s1 + n * centroids * centroids) / n.clamp_min(1.0)
    var = var.clamp_min(0.0)
    pi = counts / counts.sum(1, keepdim=True).clamp_min(1.0)  # (C, K)
    return pi, var, counts
