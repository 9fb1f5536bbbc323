"""Entropy, leakage and reconstruction-error bounds from a fitted per-class mixture.

All entropies are differential entropies in nats of the *whole* feature vector (D
dimensions), computed in float64 (D = 512 dimensions of log terms add up).

Why these are upper bounds (the paper's mixture bound on h(z), made precise; docs/cem.md):

* For any discrete variable J and continuous Z, ``h(Z) <= H(J) + h(Z | J)`` (because
  ``h(Z) = H(J) + h(Z | J) - H(J | Z)`` and ``H(J | Z) >= 0``). Take J = (class, cluster).
* Given J = j, the noisy feature z = zhat + eps has per-dimension variances ``v_jd + sigma^2``.
  Among all densities with those variances, the Gaussian has the largest entropy, and by
  Hadamard's inequality a diagonal covariance has a larger determinant than any covariance
  with the same diagonal. So ``h(Z | J = j) <= 1/2 sum_d log(2 pi e (v_jd + sigma^2))``
  whatever the true shape of the cluster is.
* Hence the bound of :func:`mixture_entropy_bound` holds for the *population* quantities;
  computed from a finite sample it is a plug-in estimate of that bound.
* For the marginal over classes, the mixture of class mixtures with the class frequencies
  ``w_c`` as weights is the right object: ``h(z) <= H(w) + sum_c w_c bound_c``
  (:func:`feature_entropy_bound`). The class-average ``sum_c w_c bound_c`` alone bounds
  ``h(z | y)``, which is *smaller* than ``h(z)``: using it for I(x; z) would not be an
  upper bound.
* ``I(x; z) = h(z) - h(z | x)`` and ``h(z | x) >= h(eps)`` (the encoder is deterministic
  given x; any other randomness before the noise only raises ``h(z | x)``), so
  ``I(x; z) <= bound - h(eps)`` (:func:`mutual_information_bound`).
* The paper's theorem: the MSE per input dimension of any reconstruction satisfies
  ``xi >= exp(2 h(x | z) / d) / (2 pi e)``, and ``h(x | z) = h(x) - I(x; z) >= h(x) - I_bound``.
  This needs a *lower* bound (or an honest estimate) of h(x), in the units in which the MSE
  is measured (images in [0, 1], d = C * H * W).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = [
    "LOG_2PI_E",
    "conditional_entropy_lower_bound",
    "feature_entropy_bound",
    "gaussian_entropy",
    "mixture_entropy_bound",
    "mse_lower_bound",
    "mutual_information_bound",
    "nats_to_bits",
    "noise_entropy",
]

LOG_2PI_E = math.log(2.0 * math.pi * math.e)


def nats_to_bits(h: float | Tensor) -> float | Tensor:
    """Convert nats to bits."""
    return h / math.log(2.0)


def gaussian_entropy(var: Tensor) -> Tensor:
    """Entropy of N(mu, diag(var)) in nats: ``(..., D) -> (...)``, = 1/2 log((2 pi e)^D det)."""
    var = var.double()
    return 0.5 * (LOG_2PI_E + torch.log(var)).sum(-1)


def noise_entropy(sigma: float, dim: int) -> float:
    """Entropy of D-dimensional N(0, sigma^2 I) noise in nats."""
    if not sigma > 0:
        raise ValueError(f"sigma must be > 0, got {sigma!r}")
    return 0.5 * dim * (LOG_2PI_E + 2.0 * math.log(sigma))


def _entropy_of_weights(w: Tensor) -> Tensor:
    """Shannon entropy (nats) of weights along the last dim, with 0 log 0 = 0."""
    w = w.double()
    return -torch.where(w > 0, w * torch.log(w.clamp_min(1e-300)), torch.zeros_like(w)).sum(-1)


def mixture_entropy_bound(pi: Tensor, var: Tensor, sigma: float = 0.0) -> Tensor:
    """Upper bound on the entropy of a diagonal Gaussian mixture plus N(0, sigma^2 I) noise.

    ``sum_k pi_k [-log pi_k + 1/2 log((2 pi e)^D det(diag(var_k) + sigma^2 I))]``, the
    paper's per-class bound (see the module docstring for why it holds). Components
    with zero weight contribute nothing.

    Args:
        pi: (..., K) weights summing to 1.
        var: (..., K, D) per-dimension variances of the (clean) components.
        sigma: Std of the added Gaussian noise.

    Returns:
        (...) bound in nats (float64).

    Example:
        >>> b = mixture_entropy_bound(torch.tensor([1.0]), torch.ones(1, 3))
        >>> round(float(b), 4) == round(1.5 * LOG_2PI_E, 4)
        True
    """
    pi = pi.double()
    h_comp = gaussian_entropy(var.double() + sigma * sigma)  # (..., K)
    h_comp = torch.where(
        pi > 0, h_comp, torch.zeros_like(h_comp)
    )  # unused components may be degenerate
    return _entropy_of_weights(pi) + (pi * h_comp).sum(-1)


def feature_entropy_bound(pi: Tensor, var: Tensor, class_weights: Tensor, sigma: float) -> Tensor:
    """Upper bound on h(z) of the noisy features over all classes, in nats.

    The marginal is the mixture of the class mixtures weighted by the class frequencies
    ``w_c``: ``h(z) <= H(w) + sum_c w_c * mixture_entropy_bound(pi_c, var_c, sigma)``.

    Args:
        pi: (C, K); var: (C, K, D); class_weights: (C,) non-negative (normalised here;
            classes with weight 0 are ignored).
        sigma: Noise std.
    """
    w = class_weights.double()
    w = w / w.sum().clamp_min(1e-300)
    per_class = mixture_entropy_bound(pi, var, sigma)  # (C,)
    per_class = torch.where(w > 0, per_class, torch.zeros_like(per_class))
    return _entropy_of_weights(w) + (w * per_class).sum()


def mutual_information_bound(
    h_z_bound: float | Tensor, sigma: float, dim: int, *, noise_entropy_nats: float | None = None
) -> float:
    """Upper bound on I(x; z) in nats: ``h(z) bound - h(eps)`` (clamped at 0).

    ``h(eps)`` is the Gaussian N(0, sigma^2 I) entropy unless ``noise_entropy_nats`` (the
    actual noise's entropy of the whole vector, e.g. Laplace: ``dim * (1 + ln 2b)``) is given.
    """
    h_eps = noise_entropy(sigma, dim) if noise_entropy_nats is None else noise_entropy_nats
    return max(0.0, float(h_z_bound) - float(h_eps))


def conditional_entropy_lower_bound(h_x: float, mi_upper: float) -> float:
    """Lower bound on h(x | z) = h(x) - I(x; z) given h(x) (or a lower bound on it) in nats."""
    return float(h_x) - float(mi_upper)


def mse_lower_bound(h_x_given_z: float, d: int) -> float:
    """The paper's bound on the per-dimension MSE of any reconstruction of x from z.

    ``xi >= exp(2 h(x | z) / d) / (2 pi e)``, with ``h(x | z)`` in nats for the whole
    d-dimensional input (in the units the MSE is measured in).

    Example:
        >>> round(mse_lower_bound(0.5 * 4 * math.log(2 * math.pi * math.e * 0.01), 4), 6)
        0.01
    """
    if d < 1:
        raise ValueError(f"d must be >= 1, got {d}")
    return math.exp(2.0 * float(h_x_given_z) / d - LOG_2PI_E)
