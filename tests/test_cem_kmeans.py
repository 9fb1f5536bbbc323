"""Batched k-means: planted clusters, agreement with scikit-learn, re-seeding, warm start."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from splitcem.cem.kmeans import batched_kmeans, cluster_stats, kmeans_plusplus, pad_by_class


def _planted(c: int, k: int, n_per: int, d: int, *, spread: float = 0.05, seed: int = 0):
    """C classes, each with K well-separated Gaussian blobs of n_per points in D dims."""
    g = torch.Generator().manual_seed(seed)
    centers = torch.randn(c, k, d, generator=g) * 3.0  # (C, K, D)
    x = centers.unsqueeze(2) + spread * torch.randn(c, k, n_per, d, generator=g)  # (C, K, n, D)
    truth = torch.arange(k).repeat_interleave(n_per).expand(c, -1)  # (C, K*n)
    perm = torch.randperm(k * n_per, generator=g)
    return x.reshape(c, k * n_per, d)[:, perm], truth[:, perm], centers


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Two labelings of the same points define the same partition (up to renaming)."""
    pairs = set(zip(a.tolist(), b.tolist(), strict=True))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_pad_by_class_roundtrip():
    z = torch.randn(11, 3)
    y = torch.tensor([2, 0, 2, 2, 1, 0, 2, 3, 3, 2, 0])
    x, mask = pad_by_class(z, y, 5)
    assert x.shape == (5, 5, 3) and mask.shape == (5, 5)
    assert mask.sum(1).tolist() == [3, 1, 5, 2, 0]
    for c in range(5):  # class order preserved, padding zero
        torch.testing.assert_close(x[c][mask[c]], z[y == c])
        assert (x[c][~mask[c]] == 0).all()


def test_recovers_planted_clusters_several_classes():
    x, truth, centers = _planted(c=4, k=3, n_per=40, d=6)
    res = batched_kmeans(x, k=3, generator=torch.Generator().manual_seed(1))
    assert res.converged
    for c in range(4):
        assert _same_partition(res.assign[c], truth[c])
        # each found centroid is within noise of a planted one
        dmin = torch.cdist(res.centroids[c], centers[c]).min(1).values
        assert (dmin < 0.1).all()
    assert res.counts.tolist() == [[40.0] * 3] * 4


def test_masks_ignore_padding_and_unequal_classes():
    x, truth, _ = _planted(c=3, k=2, n_per=30, d=4)
    z = torch.cat([x[0], x[1][:20], x[2][:7]])
    y = torch.tensor([0] * 60 + [1] * 20 + [2] * 7)
    xp, mask = pad_by_class(z, y, 3)
    res = batched_kmeans(xp, mask, 2, generator=torch.Generator().manual_seed(0))
    assert res.counts.sum(1).tolist() == [60.0, 20.0, 7.0]
    assert _same_partition(res.assign[0], truth[0])
    pi, var, counts = cluster_stats(xp, mask, res.centroids, res.assign)
    torch.testing.assert_close(pi.sum(1), torch.ones(3))
    assert (var >= 0).all() and torch.equal(counts, res.counts)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_inertia_matches_sklearn(seed):
    sklearn_cluster = pytest.importorskip("sklearn.cluster")
    # overlapping blobs: a real optimisation problem, not a trivially separable one
    x, _, _ = _planted(c=3, k=4, n_per=60, d=8, spread=1.2, seed=seed)
    g = torch.Generator().manual_seed(seed)
    res = batched_kmeans(x, k=4, n_init=10, max_iter=300, generator=g)
    for c in range(3):
        km = sklearn_cluster.KMeans(n_clusters=4, n_init=5, random_state=seed).fit(
            x[c].double().numpy()
        )
        ours = float(res.inertia[c])
        assert ours <= km.inertia_ * 1.01, (c, ours, km.inertia_)
        # and our inertia is what it says: the sum of squared distances to the centroids
        d2 = torch.cdist(x[c].double(), res.centroids[c].double()).pow(2).min(1).values.sum()
        assert abs(float(d2) - ours) <= 1e-3 * ours


def test_empty_cluster_is_reseeded_at_farthest_point():
    # two real blobs; init puts two centroids far away, so they start empty
    g = torch.Generator().manual_seed(0)
    a = torch.randn(30, 2, generator=g) * 0.05
    b = torch.randn(30, 2, generator=g) * 0.05 + torch.tensor([4.0, 0.0])
    x = torch.cat([a, b]).unsqueeze(0)  # (1, 60, 2)
    init = torch.tensor([[[2.0, 0.0], [100.0, 100.0], [-100.0, 100.0]]])  # (1, 3, 2)
    res = batched_kmeans(x, k=3, init=init, max_iter=50)
    assert (res.counts > 0).all(), res.counts  # nothing stays empty
    assert (res.centroids.abs() < 10).all()  # the far-away centroids were moved onto data
    # with a single-point class and K = 3: no crash, two empty clusters, weights stay valid
    x1 = torch.zeros(1, 1, 2)
    res1 = batched_kmeans(x1, k=3, generator=g)
    pi, var, _ = cluster_stats(x1, torch.ones(1, 1, dtype=torch.bool), res1.centroids, res1.assign)
    assert res1.counts.sum() == 1 and float(pi.sum()) == 1.0 and (var == 0).all()


def test_warm_start_converges_faster():
    x, _, _ = _planted(c=5, k=5, n_per=50, d=16, spread=3.0, seed=3)  # overlapping
    cold = batched_kmeans(x, k=5, max_iter=100, generator=torch.Generator().manual_seed(0))
    # next "epoch": slightly moved features, warm-started from the last centroids
    x2 = x + 0.01 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    warm = batched_kmeans(x2, k=5, init=cold.centroids, max_iter=100)
    cold2 = batched_kmeans(x2, k=5, max_iter=100, generator=torch.Generator().manual_seed(0))
    assert warm.converged and warm.n_iter < cold2.n_iter, (warm.n_iter, cold2.n_iter)


def test_init_valid_mixes_warm_and_seeded_classes():
    x, truth, _ = _planted(c=2, k=2, n_per=20, d=3)
    good = batched_kmeans(x, k=2, generator=torch.Generator().manual_seed(0))
    init = good.centroids.clone()
    init[1] = float("nan")  # class 1 has no warm start: must be seeded, NaN must not leak
    res = batched_kmeans(
        x,
        k=2,
        init=init,
        init_valid=torch.tensor([True, False]),
        generator=torch.Generator().manual_seed(0),
    )
    assert torch.isfinite(res.centroids).all()
    assert _same_partition(res.assign[1], truth[1])


def test_kmeans_plusplus_picks_distinct_blobs():
    x, truth, _ = _planted(c=6, k=4, n_per=10, d=5)
    seeds = kmeans_plusplus(
        x, torch.ones(6, 40, dtype=torch.bool), 4, generator=torch.Generator().manual_seed(0)
    )
    blob = torch.cdist(seeds, x).argmin(-1)  # (C, K) nearest data point of each seed
    for c in range(6):
        assert len(set(truth[c][blob[c]].tolist())) == 4


def test_deterministic_given_generator():
    x = torch.tensor(np.random.default_rng(0).normal(size=(2, 50, 4)), dtype=torch.float32)
    r1 = batched_kmeans(x, k=3, generator=torch.Generator().manual_seed(5))
    r2 = batched_kmeans(x, k=3, generator=torch.Generator().manual_seed(5))
    assert torch.equal(r1.centroids, r2.centroids)
