"""L_C, both forms, against slow per-class / per-cluster loop oracles (values and gradients)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcem.cem.kmeans import batched_kmeans, cluster_stats, pad_by_class
from splitcem.cem.loss import (
    _paper_loss_per_cluster,
    _paper_loss_per_sample,
    cem_loss,
    objective_from_stats,
    paper_loss,
    reference_loss,
)

# ----------------------------------------------------------------------------- oracles


def _oracle_assign(zc: torch.Tensor, mu: torch.Tensor) -> list[int]:
    return [int(((zi - mu) ** 2).sum(-1).argmin()) for zi in zc]


def paper_oracle(z, y, centroids, pi, var, counts, fitted, sigma, tau=None, blend_scale=10.0):
    """mean over present fitted classes of sum_k pi_ck mean_d log(v_mix_ckd + sigma^2)."""
    c_, k_, _ = centroids.shape
    s2 = sigma**2
    total, n_present = z.new_zeros(()), 0
    for c in range(c_):
        idx = [i for i in range(len(y)) if int(y[i]) == c]
        if not idx or not bool(fitted[c]):
            continue
        n_present += 1
        zc = z[idx]
        a = _oracle_assign(zc.detach(), centroids[c])
        for k in range(k_):
            members = [j for j in range(len(idx)) if a[j] == k]
            if members:
                n = len(members)
                lam = min(blend_scale * n / max(float(counts[c, k]), 1.0), 0.99)
                b = torch.stack([(zc[j] - centroids[c, k]) ** 2 for j in members]).mean(0)
                v = lam * b + (1 - lam) * var[c, k]
            else:
                v = var[c, k]
            t = torch.log(v + s2)
            if tau is not None:
                t = torch.relu(t - math.log(tau * s2 + s2))
            total = total + pi[c, k] * t.mean()
    return total / max(n_present, 1)


def reference_oracle(z, y, centroids, pi, var, counts, fitted, sigma, tau=0.125, blend=10.0):
    """The reference's loop with correct indexing: pi / v of the sample's own class."""
    c_ = centroids.shape[0]
    total, n_present = z.new_zeros(()), 0
    for c in range(c_):
        idx = [i for i in range(len(y)) if int(y[i]) == c]
        if not idx or not bool(fitted[c]):
            continue
        n_present += 1
        zc = z[idx]
        a = _oracle_assign(zc.detach(), centroids[c])
        for k in sorted(set(a)):  # present clusters only
            members = [j for j in range(len(idx)) if a[j] == k]
            n = len(members)
            lam = min(blend * n / max(float(counts[c, k]), 1.0), 0.99)
            b = torch.stack([((zc[j] - centroids[c, k]) ** 2).mean() for j in members]).mean()
            v = lam * b + (1 - lam) * var[c, k].mean()
            total = total + pi[c, k] * torch.relu(
                torch.log(v + 0.01) - math.log(tau * sigma**2 + 0.01)
            )
    return total / max(n_present, 1)


# ----------------------------------------------------------------------------- fixtures


def _mixture(c: int, k: int, d: int, seed: int, n_fit: int = 40):
    """A fitted mixture on random features in (0, 1) (like the sigmoid client's)."""
    g = torch.Generator().manual_seed(seed)
    zf = torch.rand(c * n_fit, d, generator=g)
    yf = torch.arange(c).repeat_interleave(n_fit)
    x, mask = pad_by_class(zf, yf, c)
    res = batched_kmeans(x, mask, k, generator=g)
    pi, var, counts = cluster_stats(x, mask, res.centroids, res.assign)
    fitted = torch.ones(c, dtype=torch.bool)
    return dict(centroids=res.centroids, pi=pi, var=var, counts=counts, fitted=fitted)


def _batch(b: int, c: int, d: int, seed: int, classes: list[int] | None = None):
    g = torch.Generator().manual_seed(seed + 1000)
    z = torch.rand(b, d, generator=g, dtype=torch.float64).float().requires_grad_(True)
    pool = torch.tensor(classes if classes is not None else list(range(c)))
    y = pool[torch.randint(len(pool), (b,), generator=g)]
    return z, y


def _check(fast, slow, z):
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=1e-5)

    def grad(t):  # an empty batch gives a constant: zero gradient
        if not t.requires_grad:
            return torch.zeros_like(z)
        (g,) = torch.autograd.grad(t, z, allow_unused=True, retain_graph=True)
        return torch.zeros_like(z) if g is None else g

    g_fast, g_slow = grad(fast), grad(slow)
    torch.testing.assert_close(g_fast, g_slow, atol=1e-7, rtol=1e-4)


# ----------------------------------------------------------------------------- tests


@pytest.mark.parametrize("tau", [None, 0.5])
@pytest.mark.parametrize("b", [40, 12])  # C*K = 18: per-cluster layout at 40, per-sample at 12
def test_paper_form_matches_loop_oracle(tau, b):
    m = _mixture(c=6, k=3, d=10, seed=0)
    z, y = _batch(b, 6, 10, seed=0, classes=[0, 1, 3, 4])  # classes 2 and 5 absent
    fast = paper_loss(z, y, sigma=0.1, tau=tau, **m)
    slow = paper_oracle(z, y, sigma=0.1, tau=tau, **m)
    _check(fast, slow, z)


def test_reference_form_matches_loop_oracle():
    m = _mixture(c=6, k=3, d=10, seed=1)
    z, y = _batch(40, 6, 10, seed=1, classes=[0, 2, 5])
    fast = reference_loss(z, y, sigma=0.1, tau=0.125, **m)
    slow = reference_oracle(z, y, sigma=0.1, tau=0.125, **m)
    assert fast > 0  # random features are far wider than tau * sigma^2: hinge active
    _check(fast, slow, z)


@settings(max_examples=25, deadline=None)
@given(
    seed=st.integers(0, 10_000),
    b=st.integers(0, 24),
    c=st.integers(1, 5),
    k=st.integers(1, 4),
    form=st.sampled_from(["paper", "reference"]),
    unfitted=st.booleans(),
)
def test_both_forms_sweep(seed, b, c, k, form, unfitted):
    d = 5
    m = _mixture(c=c, k=k, d=d, seed=seed, n_fit=8)
    if unfitted and c > 1:
        m["fitted"][seed % c] = False  # a class without a mixture: its samples are ignored
    z, y = _batch(b, c, d, seed=seed)
    sigma = 0.05 + (seed % 7) / 20
    fast = cem_loss(z, y, form=form, sigma=sigma, **m)
    oracle = paper_oracle if form == "paper" else reference_oracle
    slow = oracle(z, y, sigma=sigma, **m)
    _check(fast, slow, z)


@pytest.mark.parametrize("tau", [None, 0.5])
def test_paper_layouts_agree(tau):
    """The per-cluster layout (C*K <= B) and the per-sample one give one value and gradient."""
    m = _mixture(c=4, k=3, d=16, seed=3)
    m["fitted"][2] = False
    z, y = _batch(48, 4, 16, seed=3)
    args = (y, m["centroids"], m["pi"], m["var"], m["counts"], m["fitted"], 0.01, tau, 10.0)
    _check(_paper_loss_per_cluster(z, *args), _paper_loss_per_sample(z, *args, None), z)


@pytest.mark.parametrize("b", [48, 8])
def test_nan_feature_of_an_ignored_class_still_poisons_the_loss(b):
    """CEM checks only L_C while it is active: a NaN anywhere in z must reach it."""
    m = _mixture(c=4, k=3, d=16, seed=4)
    m["fitted"][1] = False
    z, y = _batch(b, 4, 16, seed=4, classes=[0, 1])
    z = z.detach().clone()
    z[int((y == 1).nonzero()[0])] = float("nan")
    for form in ("paper", "reference"):
        assert torch.isnan(cem_loss(z, y, form=form, sigma=0.1, **m))


def test_single_sample_cluster_and_absent_clusters():
    m = _mixture(c=3, k=4, d=6, seed=2)
    z, y = _batch(1, 3, 6, seed=2, classes=[1])  # one sample: one cluster with n = 1
    for form, oracle in (("paper", paper_oracle), ("reference", reference_oracle)):
        fast = cem_loss(z, y, form=form, sigma=0.1, **m)
        assert torch.isfinite(fast)
        _check(fast, oracle(z, y, sigma=0.1, **m), z)
    (g,) = torch.autograd.grad(cem_loss(z, y, form="paper", sigma=0.1, **m), z)
    assert g.abs().sum() > 0  # the lone sample is pulled towards its centroid


@pytest.mark.parametrize("form", ["paper", "reference"])
def test_gradient_reaches_only_the_features(form):
    """The fitted statistics are constants of the step even if they carry a graph (e.g.
    a mixture fitted from features that were not detached): only z gets a gradient."""
    m = _mixture(c=3, k=2, d=6, seed=3)
    for key in ("centroids", "pi", "var"):
        m[key] = m[key].clone().requires_grad_(True)
    z, y = _batch(12, 3, 6, seed=3)
    loss = cem_loss(z, y, form=form, sigma=0.1, **m)
    assert loss.requires_grad
    loss.backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    assert all(m[key].grad is None for key in ("centroids", "pi", "var"))


def test_loss_decreases_when_features_tighten():
    m = _mixture(c=2, k=2, d=8, seed=4)
    z, y = _batch(16, 2, 8, seed=4)
    with torch.no_grad():
        from splitcem.cem.loss import assign_own_class

        mu = m["centroids"][y, assign_own_class(z, y, m["centroids"])]
        tight = mu + 0.1 * (z - mu)
    for form in ("paper", "reference"):
        assert cem_loss(tight, y, form=form, sigma=0.1, **m) < cem_loss(
            z.detach(), y, form=form, sigma=0.1, **m
        )


def test_accepts_image_shaped_features_and_half_precision():
    m = _mixture(c=2, k=2, d=2 * 2 * 2, seed=5)
    z, y = _batch(6, 2, 8, seed=5)
    flat = cem_loss(z, y, form="paper", sigma=0.1, **m)
    img = cem_loss(z.view(6, 2, 2, 2), y, form="paper", sigma=0.1, **m)
    torch.testing.assert_close(flat, img)
    half = cem_loss(z.bfloat16(), y, form="paper", sigma=0.1, **m)
    assert half.dtype == torch.float32 and abs(float(half.detach() - flat.detach())) < 0.05


def test_paper_form_rejects_zero_sigma():
    m = _mixture(c=2, k=2, d=4, seed=6)
    z, y = _batch(4, 2, 4, seed=6)
    with pytest.raises(ValueError, match="sigma"):
        paper_loss(z, y, sigma=0.0, **m)


def test_objective_from_stats_is_the_whole_batch_limit():
    m = _mixture(c=3, k=2, d=5, seed=7)
    mask = torch.tensor([True, False, True])
    v = objective_from_stats(m["pi"], m["var"], 0.1, form="paper", tau=None, class_mask=mask)
    per = [(m["pi"][c] * torch.log(m["var"][c] + 0.01).mean(-1)).sum() for c in (0, 2)]
    torch.testing.assert_close(v, torch.stack(per).mean())
