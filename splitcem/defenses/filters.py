"""Information filters on the features: random feature dropout and per-sample top-k.

Both act in :meth:`~splitcem.defenses.base.Defense.transform`, i.e. on what leaves the
client, in training *and* at deployment: a filter that were switched off at inference would
hand the attacker (who observes deployed features) everything it was meant to remove.
Put them before ``noise`` in the stack so the noise is added to the filtered features.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from splitcem.defenses.base import Defense, register_defense
from splitcem.errors import ConfigError

__all__ = ["FeatureDropout", "TopK", "topk_count", "topk_mask"]


@register_defense("dropout")
class FeatureDropout(Defense):
    """Feature dropout: zero each feature with probability p, in training and deployment.

    Every feature (each element of the (C, H, W) client output, independently per sample) is
    set to 0 with probability ``p``. Unlike ``nn.Dropout`` the filter is also applied in
    evaluation / deployment by default, because it is a privacy filter: the attacker sees the
    deployed features, so a filter that switched off at inference would protect nothing
    there. The gradient flows only through the kept features (they are multiplied by the mask).

    Args:
        p: Drop probability in [0, 1). Reference code default: 0.2 (``dropout0.2``).
        rescale: Divide the kept features by (1 - p) so their expectation is unchanged
            (inverted dropout, as ``nn.Dropout``). The reference code does not rescale
            (``masked_fill(mask, 0)``), so the default is ``False``.
        train_only: Apply the filter only in training mode (ordinary dropout, a
            regulariser rather than a privacy filter). Default ``False``.
    """

    strength_param = "p"
    mid_epoch_resumable = True  # nothing accumulates within an epoch
    no_leakage_bound = ("what is sent is dropout(z) + noise, which the clean-feature mixture "
                        "does not model")

    def __init__(self, *, p: float = 0.2, rescale: bool = False, train_only: bool = False) -> None:
        super().__init__()
        p = float(p)
        if not 0.0 <= p < 1.0:
            raise ConfigError(f"dropout p must be in [0, 1), got {p!r}")
        self.p = p
        self.rescale = bool(rescale)
        self.train_only = bool(train_only)

    def transform(self, z: Tensor) -> Tensor:
        if self.p == 0.0 or (self.train_only and not self.training):
            return z
        # (B, C, H, W) Bernoulli(1 - p) keep mask, drawn from the global generator so a fixed
        # seed gives the same mask
        keep = torch.rand_like(z, dtype=torch.float32) >= self.p
        out = z * keep.to(z.dtype)
        if self.rescale:
            out = out / (1.0 - self.p)
        return out

    def match_transform(self, z: Tensor, observed: Tensor | None) -> Tensor:
        """The observed zeros as the mask when they are visible (no noise after the filter);
        otherwise the expectation over masks, (1 - p) z (z with ``rescale``)."""
        if self.p == 0.0 or (self.train_only and not self.training):
            return z
        if observed is None:
            return z if self.rescale else z * (1.0 - self.p)
        out = z * (observed != 0).to(z.dtype)
        return out / (1.0 - self.p) if self.rescale else out


def topk_count(ratio: float, d: int) -> int:
    """Number of features top-k keeps out of ``d``: ``k = ceil(ratio * d)``, at least 1.

    ``ceil`` (not ``round``) so any ratio > 0 keeps at least one feature and the kept share
    is never below ``ratio``. A small tolerance absorbs float error in ``ratio * d``
    (``0.3 * 10`` is 3.0000000000000004, which must give 3, not 4).
    """
    return max(1, min(d, math.ceil(ratio * d - 1e-9)))


def topk_mask(z: Tensor, ratio: float) -> Tensor:
    """0/1 mask (same shape and dtype as ``z``) keeping each sample's ``topk_count`` largest
    features by magnitude. Ties are broken by ``torch.topk`` (deterministically per input),
    so exactly k positions per sample are kept."""
    b = z.shape[0]
    flat = z.detach().reshape(b, -1)  # (B, D)
    k = topk_count(ratio, flat.shape[1])
    idx = flat.abs().topk(k, dim=1, sorted=False).indices  # (B, k)
    mask = torch.zeros_like(flat)
    mask.scatter_(1, idx, 1.0)
    return mask.reshape(z.shape)


@register_defense("topk")
class TopK(Defense):
    """Top-k pruning: keep each sample's largest ratio·D features by magnitude, zero the rest.

    For every sample the ``k = ceil(ratio * D)`` features (D = C*H*W) with the largest
    absolute value are kept and the other D - k are set to 0; exactly k positions are kept
    (a kept feature that is itself 0 stays 0). The gradient is masked: it reaches only the
    kept features (no straight-through estimate for the pruned ones). Applied in training and
    deployment alike.

    The reference code (``prune_defense``) instead zeroes the smallest ``ratio`` share of the
    *whole batch tensor* by signed value; per-sample selection makes a sample's output
    independent of the rest of its batch, which deployment needs.

    Args:
        ratio: Share of features kept, in (0, 1]. No paper default is recoverable here; the
            CPU configs use 0.3 (see docs/defenses.md). 1 disables the filter.
    """

    strength_param = "ratio"
    mid_epoch_resumable = True  # nothing accumulates within an epoch
    no_leakage_bound = ("what is sent is topk(z) + noise, which the clean-feature mixture "
                        "does not model")

    def __init__(self, *, ratio: float = 0.3) -> None:
        super().__init__()
        ratio = float(ratio)
        if not 0.0 < ratio <= 1.0:
            raise ConfigError(
                f"topk ratio (share of features kept) must be in (0, 1], got {ratio!r}"
            )
        self.ratio = ratio

    def transform(self, z: Tensor) -> Tensor:
        if self.ratio == 1.0 or z.shape[0] == 0:
            return z
        return z * topk_mask(z, self.ratio)

    def match_transform(self, z: Tensor, observed: Tensor | None) -> Tensor:
        """Deterministic: the same top-k of the candidate's own features."""
        return self.transform(z)
