"""Local differential privacy on the features: clip each sample's feature vector, add noise.

The mechanism, precisely (one released feature vector per input image):

1. Flatten the client output of one sample to v in R^D (D = C*H*W).
2. **Clip** its norm: v <- v * min(1, C / ||v||_p), with p = 1 for Laplace and p = 2 for
   Gaussian. Every released vector then lies in the p-ball of radius C.
3. **Sensitivity.** Under replace-one neighbouring inputs (x vs. any other x') the clipped
   vectors differ by at most ||v - v'||_p <= ||v||_p + ||v'||_p <= 2C, so
   Delta_1 = 2C (Laplace) and Delta_2 = 2C (Gaussian). Clipping is what makes this hold for
   *any* encoder; without it the sensitivity is unbounded.
4. **Noise**, i.i.d. per coordinate:
   * Laplace: scale b = Delta_1 / epsilon = 2C / epsilon  ->  epsilon-LDP (delta = 0).
   * Gaussian, ``calibration="classic"`` (Dwork & Roth 2014, Thm A.1):
     sigma = Delta_2 * sqrt(2 ln(1.25 / delta)) / epsilon  ->  (epsilon, delta)-LDP,
     valid only for epsilon < 1 (refused otherwise).
   * Gaussian, ``calibration="analytic"`` (Balle & Wang 2018, Thm 8; the default): the
     smallest sigma with Phi(Delta/(2 sigma) - epsilon sigma/Delta)
     - e^epsilon Phi(-Delta/(2 sigma) - epsilon sigma/Delta) <= delta, found by bisection.
     Exact (necessary and sufficient) for every epsilon > 0, and never larger than classic.

The guarantee is per released vector; T releases of the same image compose to T*epsilon.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from splitcem.defenses.base import Defense, register_defense
from splitcem.errors import ConfigError

__all__ = ["LocalDP", "analytic_gaussian_sigma", "classic_gaussian_sigma", "clip_norm"]

_MECHANISMS = ("laplace", "gaussian")
_CALIBRATIONS = ("analytic", "classic")


def clip_norm(z: Tensor, c: float, p: int) -> Tensor:
    """Scale each sample of ``z`` (B, ...) so its flattened L``p`` norm is at most ``c``.

    Samples already inside the ball are unchanged; the others are projected radially onto
    its surface. Differentiable (the scale factor carries a gradient).
    """
    b = z.shape[0]
    flat = z.reshape(b, -1)  # (B, D)
    norm = flat.norm(p=p, dim=1, keepdim=True)  # (B, 1)
    # clamp_min avoids 0/0 for an all-zero vector (whose scale is then c/tiny -> min 1)
    scale = (c / norm.clamp_min(1e-12)).clamp(max=1.0)
    return (flat * scale).reshape(z.shape)


def classic_gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """Classic Gaussian mechanism: sigma = Delta * sqrt(2 ln(1.25/delta)) / epsilon (eps < 1)."""
    if not 0 < epsilon < 1:
        raise ConfigError(
            f"the classic Gaussian calibration is valid only for 0 < epsilon < 1, got {epsilon!r}; "
            "use calibration='analytic' for larger epsilon"
        )
    return sensitivity * math.sqrt(2.0 * math.log(1.25 / delta)) / epsilon


def _log_phi(t: float) -> float:
    """log of the standard normal CDF, accurate far into the lower tail."""
    if t > -30.0:
        return math.log(0.5 * math.erfc(-t / math.sqrt(2.0)))
    # Mills-ratio asymptotic: Phi(t) ~ phi(t) / |t| * (1 - 1/t^2) for t -> -inf
    return -0.5 * t * t - math.log(-t) - 0.5 * math.log(2.0 * math.pi) + math.log1p(-1.0 / (t * t))


def _agm_delta(s: float, epsilon: float) -> float:
    """delta achieved by Gaussian noise of std ``s`` (in units of the sensitivity)."""
    a = 1.0 / (2.0 * s) - epsilon * s
    b = -1.0 / (2.0 * s) - epsilon * s
    # e^eps * Phi(b) in log space: e^eps overflows a double for eps > 709
    return math.exp(_log_phi(a)) - math.exp(min(epsilon + _log_phi(b), 700.0))


def analytic_gaussian_sigma(sensitivity: float, epsilon: float, delta: float) -> float:
    """Smallest sigma making the Gaussian mechanism (epsilon, delta)-DP (Balle & Wang 2018).

    The achieved delta is decreasing in sigma; bisection in log space to a relative
    tolerance of 1e-10, then rounded up so the returned sigma satisfies the condition.
    """
    lo, hi = 1e-8, 1.0
    while _agm_delta(hi, epsilon) > delta:
        hi *= 2.0
        if hi > 1e12:  # pragma: no cover - unreachable for delta in (0, 1)
            raise ConfigError(f"no Gaussian calibration found for epsilon={epsilon}, delta={delta}")
    while _agm_delta(lo, epsilon) <= delta:  # only for huge epsilon
        lo /= 2.0
    for _ in range(200):
        mid = math.sqrt(lo * hi)
        if _agm_delta(mid, epsilon) > delta:
            lo = mid
        else:
            hi = mid
        if hi / lo < 1 + 1e-10:
            break
    return hi * sensitivity


@register_defense("ldp")
class LocalDP(Defense):
    """Local DP: clip each sample's features to norm C, add calibrated Laplace/Gaussian noise.

    See the module docstring for the exact mechanism. Applied in training and deployment.
    Place it last in the stack (it is the noise); filters go before it.

    ``noise_sigma`` (what CEM's entropy bound uses as the noise level) is the per-coordinate
    standard deviation: sigma for Gaussian, sqrt(2) * b for Laplace. For Laplace this is
    still the right number for CEM: CEM minimises an *upper bound* on H(z) built from the
    mixture components' covariances S + sigma^2 I, and a Gaussian has the largest entropy of
    all distributions with a given covariance, so the bound holds for Laplace noise of the
    same variance; only the constant H(noise) in H(x|z) differs (it is smaller for Laplace),
    which does not change what the encoder optimises. The bound is on the *clipped* scale:
    when clipping shrinks a sample by s < 1 the noise is sigma / s relative to the clean
    features CEM sees, so CEM then under-states the protection (it stays conservative).

    Args:
        mechanism: ``"gaussian"`` (default: the L2 sensitivity of a D-dimensional vector is
            sqrt(D) times smaller than its L1 sensitivity, so far less noise per epsilon, and
            it matches CEM's Gaussian assumption) or ``"laplace"`` (pure epsilon-LDP).
        epsilon: Privacy budget per released vector, > 0. Paper / reference default: none
            recoverable (the reference adds Laplace(1/epsilon) or Gaussian noise with
            sensitivity 1 and *no clipping*, so it has no guarantee). Default 10000: in 512
            dimensions a meaningful epsilon (<= 10) needs noise far above the signal; see
            docs/defenses.md.
        delta: For Gaussian, in (0, 1). Default 1e-5 (reference: 1e-4).
        clip: Norm bound C > 0 (L1 for Laplace, L2 for Gaussian) of each sample's flattened
            feature vector. Default 8.0: sigmoid features of D = 512 have L2 norm ~ 11, so
            typical samples are shrunk by ~0.7.
        calibration: ``"analytic"`` (default, valid for all epsilon) or ``"classic"``
            (refuses epsilon >= 1). Gaussian only.
    """

    strength_param = "epsilon"
    mid_epoch_resumable = True  # nothing accumulates within an epoch

    def __init__(
        self,
        *,
        mechanism: str = "gaussian",
        epsilon: float = 10000.0,
        delta: float = 1e-5,
        clip: float = 8.0,
        calibration: str = "analytic",
    ) -> None:
        super().__init__()
        if mechanism not in _MECHANISMS:
            raise ConfigError(f"ldp mechanism must be one of {_MECHANISMS}, got {mechanism!r}")
        if calibration not in _CALIBRATIONS:
            raise ConfigError(
                f"ldp calibration must be one of {_CALIBRATIONS}, got {calibration!r}"
            )
        epsilon, delta, clip = float(epsilon), float(delta), float(clip)
        if not (epsilon > 0 and math.isfinite(epsilon)):
            raise ConfigError(f"ldp epsilon must be a finite number > 0, got {epsilon!r}")
        if not (clip > 0 and math.isfinite(clip)):
            raise ConfigError(f"ldp clip (norm bound C) must be a finite number > 0, got {clip!r}")
        if mechanism == "gaussian" and not 0 < delta < 1:
            raise ConfigError(
                f"ldp delta must be in (0, 1) for the Gaussian mechanism, got {delta!r}"
            )
        self.mechanism = mechanism
        self.epsilon = epsilon
        self.delta = delta if mechanism == "gaussian" else 0.0
        self.clip = clip
        self.calibration = calibration
        #: replace-one sensitivity of the clipped vector in the mechanism's norm
        self.sensitivity = 2.0 * clip
        if mechanism == "laplace":
            #: Laplace scale b (per coordinate); its std is sqrt(2) * b
            self.scale = self.sensitivity / epsilon
            self.noise_sigma = math.sqrt(2.0) * self.scale
        else:
            calib = analytic_gaussian_sigma if calibration == "analytic" else classic_gaussian_sigma
            self.scale = calib(self.sensitivity, epsilon, delta)
            self.noise_sigma = self.scale

    def noise_entropy(self) -> float:
        """Entropy per feature of the mechanism's noise in nats: Laplace(b) has 1 + ln(2b),
        less than a Gaussian of the same variance (0.5 ln(2 pi e 2 b^2)) by about 0.07."""
        if self.mechanism == "laplace":
            return 1.0 + math.log(2.0 * self.scale)
        return 0.5 * math.log(2.0 * math.pi * math.e * self.scale**2)

    @property
    def norm_p(self) -> int:
        """The norm clipped and used for the sensitivity: 1 (Laplace) or 2 (Gaussian)."""
        return 1 if self.mechanism == "laplace" else 2

    def transform(self, z: Tensor) -> Tensor:
        if z.shape[0] == 0:
            return z
        z = clip_norm(z, self.clip, self.norm_p)
        if self.mechanism == "laplace":
            # Laplace(0, b) by inverse CDF from the global generator (seeded like randn);
            # u in (-1/2, 1/2), the open interval avoids log(0)
            u = torch.rand_like(z).clamp(1e-7, 1 - 1e-7) - 0.5
            noise = -self.scale * torch.sign(u) * torch.log1p(-2.0 * u.abs())
        else:
            noise = self.scale * torch.randn_like(z)
        return z + noise

    def match_transform(self, z: Tensor, observed: Tensor | None) -> Tensor:
        """The deterministic part: the clipping (the noise is zero-mean)."""
        return z if z.shape[0] == 0 else clip_norm(z, self.clip, self.norm_p)
