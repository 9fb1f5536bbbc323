"""NoPeek (Vepakomma et al., 2020): penalise the distance correlation between inputs and
features, so the features carry less (linear *and* non-linear) dependence on the raw image.

Distance correlation of a batch (Székely, Rizzo & Bakirov 2007), exact V-statistic:

    a_ij = ||x_i - x_j||_2,   A = a - rowmean(a) - colmean(a) + mean(a)   (double-centred)
    b_ij = ||z_i - z_j||_2,   B likewise
    dCov^2(x, z) = mean_ij A_ij B_ij,   dVar^2(x) = mean_ij A_ij^2,   dVar^2(z) = mean_ij B_ij^2
    dCor(x, z) = dCov(x, z) / sqrt(dVar(x) dVar(z))       (in [0, 1]; 0 if a dVar is 0)

``dCor`` is invariant to scaling and to translating x or z, so it does not matter that x is
the normalised input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from splitcem._validate import check_float
from splitcem.defenses.base import Defense, StepContext, register_defense

__all__ = ["NoPeek", "distance_correlation", "double_centered_distances"]

#: Squared distances below this count as 0 (and get no gradient): sqrt has an infinite
#: derivative at 0, so without it identical rows (and the diagonal) would give NaN gradients.
EPS = 1e-12


def double_centered_distances(v: Tensor) -> Tensor:
    """Double-centred Euclidean distance matrix of the rows of ``v`` (B, D) -> (B, B).

    Squared distances come from the Gram matrix of the batch-centred rows (centring first
    keeps the cancellation in |u|^2 + |w|^2 - 2 u.w small); they are clamped at 0, and
    entries <= ``EPS`` (the diagonal, duplicate rows) are set to exactly 0 with no gradient.
    """
    v = v - v.mean(dim=0, keepdim=True)  # (B, D), distances are translation invariant
    sq = (v * v).sum(dim=1)  # (B,)
    d2 = (sq[:, None] + sq[None, :] - 2.0 * (v @ v.T)).clamp_min(0.0)  # (B, B)
    pos = d2 > EPS
    d = torch.where(pos, d2.clamp_min(EPS).sqrt(), torch.zeros_like(d2))  # (B, B)
    return d - d.mean(dim=0, keepdim=True) - d.mean(dim=1, keepdim=True) + d.mean()


def distance_correlation(x: Tensor, z: Tensor) -> Tensor:
    """Batch distance correlation dCor(x, z) in [0, 1] of two (B, ...) tensors (B >= 2).

    Defined as 0 when either side has zero distance variance (e.g. constant features), with
    a zero (not NaN) gradient there. For B = 2 it is always 1 (unless a side is constant).
    Computed in float32 or better (the input dtype if it is float64).
    """
    b = x.shape[0]
    if z.shape[0] != b:
        raise ValueError(f"x and z must have the same batch size, got {b} and {z.shape[0]}")
    if b < 2:
        raise ValueError(f"distance correlation needs a batch of at least 2, got {b}")
    dtype = torch.promote_types(z.dtype, torch.float32)
    A = double_centered_distances(x.reshape(b, -1).to(dtype))  # (B, B)
    B = double_centered_distances(z.reshape(b, -1).to(dtype))  # (B, B)
    dcov2 = (A * B).mean().clamp_min(0.0)  # V-statistic is >= 0; clamp float error
    dvar2 = (A * A).mean() * (B * B).mean()  # dVar^2(x) * dVar^2(z)
    # dCor^2 = dCov^2 / sqrt(dVar^2(x) dVar^2(z)); where a side is constant, dCov^2 = 0 too
    dcor2 = dcov2 / dvar2.clamp_min(EPS * EPS).sqrt()
    ok = (dvar2 > EPS * EPS) & (dcor2 > EPS)
    return torch.where(ok, dcor2.clamp_min(EPS).sqrt(), torch.zeros_like(dcor2))


@register_defense("nopeek")
class NoPeek(Defense):
    """NoPeek: penalise the batch distance correlation between inputs and clean features.

    Adds ``weight * dCor(x, z_clean)`` to the loss (x flattened to (B, C*H*W), z_clean to
    (B, D)); its gradient reaches the client encoder only. Acts in :meth:`loss`; the
    features sent are unchanged.

    Args:
        weight: Loss weight alpha >= 0. The reference code passes its defense strength
            (``AT_regularization_strength``, 0.3 in ``run_exp.sh``); the NoPeek paper sweeps
            0.1 to 0.5. Default 0.3 (the reference's). 0 disables the term.
    """

    strength_param = "weight"
    mid_epoch_resumable = True  # nothing accumulates within an epoch

    def __init__(self, *, weight: float = 0.3) -> None:
        super().__init__()
        self.weight = check_float("nopeek weight", weight)

    def loss(self, ctx: StepContext) -> Tensor | None:
        if self.weight == 0 or ctx.x.shape[0] < 2:
            return None
        return self.weight * distance_correlation(ctx.x.detach(), ctx.z_clean)
