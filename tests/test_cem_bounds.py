"""Entropy / leakage / MSE bounds against closed forms and Monte-Carlo entropies."""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcem.cem.bounds import (
    LOG_2PI_E,
    feature_entropy_bound,
    gaussian_entropy,
    mixture_entropy_bound,
    mse_lower_bound,
    mutual_information_bound,
    noise_entropy,
)


def _mc_mixture_entropy(pi, mu, var, n: int, seed: int) -> tuple[float, float]:
    """Monte-Carlo -E log p(z) of a diagonal Gaussian mixture: (estimate, standard error)."""
    g = torch.Generator().manual_seed(seed)
    pi, mu, var = pi.double(), mu.double(), var.double()
    comp = torch.multinomial(pi, n, replacement=True, generator=g)  # (n,)
    z = mu[comp] + var[comp].sqrt() * torch.randn(n, mu.shape[1], generator=g, dtype=torch.float64)
    # log N(z; mu_k, var_k) for every k: (n, K)
    logn = -0.5 * (
        ((z[:, None] - mu[None]) ** 2) / var[None] + torch.log(var[None]) + math.log(2 * math.pi)
    ).sum(-1)
    logp = torch.logsumexp(torch.log(pi)[None] + logn, dim=1)  # (n,)
    return float(-logp.mean()), float(logp.std() / math.sqrt(n))


def test_single_gaussian_closed_form():
    var = torch.tensor([0.5, 2.0, 0.1])
    expected = 0.5 * math.log((2 * math.pi * math.e) ** 3 * float(var.prod()))
    assert math.isclose(float(gaussian_entropy(var)), expected, rel_tol=1e-12)
    b = mixture_entropy_bound(torch.tensor([1.0]), var[None], sigma=0.3)
    assert math.isclose(float(b), float(gaussian_entropy(var.double() + 0.09)), rel_tol=1e-12)


def test_two_separated_gaussians_equal_weights():
    d = 3
    pi = torch.tensor([0.5, 0.5])
    mu = torch.tensor([[0.0] * d, [50.0] * d])
    var = torch.full((2, d), 0.2)
    bound = float(mixture_entropy_bound(pi, var))
    assert math.isclose(bound, float(gaussian_entropy(var[0])) + math.log(2), rel_tol=1e-12)
    mc, se = _mc_mixture_entropy(pi, mu, var, 20_000, seed=0)
    assert abs(bound - mc) < 4 * se + 1e-3  # separated: the bound is tight


def test_zero_weight_components_are_ignored():
    b1 = mixture_entropy_bound(torch.tensor([1.0, 0.0]), torch.tensor([[1.0, 1.0], [0.0, 0.0]]))
    b2 = mixture_entropy_bound(torch.tensor([1.0]), torch.tensor([[1.0, 1.0]]))
    assert torch.isfinite(b1) and math.isclose(float(b1), float(b2))


@settings(max_examples=12, deadline=None)
@given(seed=st.integers(0, 10_000), k=st.integers(1, 4), d=st.integers(1, 4))
def test_bound_never_below_monte_carlo_entropy(seed, k, d):
    g = torch.Generator().manual_seed(seed)
    pi = torch.rand(k, generator=g, dtype=torch.float64) + 0.05
    pi = pi / pi.sum()
    mu = torch.randn(k, d, generator=g, dtype=torch.float64) * float(torch.rand(1, generator=g)) * 3
    var = torch.rand(k, d, generator=g, dtype=torch.float64) * 0.5 + 0.01
    sigma = 0.1
    bound = float(mixture_entropy_bound(pi, var, sigma))
    mc, se = _mc_mixture_entropy(pi, mu, var + sigma**2, 20_000, seed=seed)
    assert bound >= mc - 4 * se, (bound, mc, se)


def test_class_mixture_equals_flat_mixture():
    # H(w) + sum_c w_c bound_c is the bound of the flat mixture with weights w_c pi_ck
    g = torch.Generator().manual_seed(0)
    pi = torch.rand(3, 2, generator=g)
    pi = pi / pi.sum(1, keepdim=True)
    var = torch.rand(3, 2, 4, generator=g)
    w = torch.tensor([10.0, 30.0, 60.0])
    h = feature_entropy_bound(pi, var, w, sigma=0.1)
    flat = mixture_entropy_bound((w[:, None] / w.sum() * pi).reshape(-1), var.reshape(6, 4), 0.1)
    torch.testing.assert_close(h, flat)
    # a class with weight 0 (absent) does not count, whatever its statistics
    var0 = var.clone()
    var0[1] = float("nan")
    h0 = feature_entropy_bound(pi, var0, torch.tensor([10.0, 0.0, 60.0]), sigma=0.1)
    assert torch.isfinite(h0)


def test_mutual_information_of_one_gaussian_is_the_channel_capacity():
    v, sigma, d = 0.04, 0.1, 512
    var = torch.full((1, d), v, dtype=torch.float64)
    h_z = mixture_entropy_bound(torch.tensor([1.0]), var, sigma)
    mi = mutual_information_bound(h_z, sigma, d)
    assert math.isclose(mi, 0.5 * d * math.log(1 + v / sigma**2), rel_tol=1e-9)
    assert math.isclose(noise_entropy(sigma, d), 0.5 * d * (LOG_2PI_E + 2 * math.log(sigma)))


def test_mse_lower_bound_formula():
    for h, d in ((-100.0, 3072), (5.0, 10), (0.0, 1)):
        assert math.isclose(mse_lower_bound(h, d), math.exp(2 * h / d) / (2 * math.pi * math.e))
    # tight for a Gaussian input with no information leaked: the MMSE is its variance
    s2, d = 0.03, 100
    h_x = 0.5 * d * math.log(2 * math.pi * math.e * s2)
    assert math.isclose(mse_lower_bound(h_x - 0.0, d), s2, rel_tol=1e-12)
