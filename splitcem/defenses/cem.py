"""The CEM regulariser: a :class:`~splitcem.defenses.base.Defense` named ``cem``.

This module is the plumbing around the maths of :mod:`splitcem.cem` (k-means, L_C, the
bounds), which knows nothing of defenses. It adds ``lambda * L_C`` to the training loss
(L_C from :mod:`splitcem.cem.loss`; it depends only on the clean features, so its gradient
reaches only the client encoder), banks the features and refits the per-class mixture at
every epoch end, reporting the entropy / leakage bounds of :mod:`splitcem.cem.bounds`. It
transforms nothing and adds no noise: it regularises the encoder *for* the noise the rest
of the stack adds, so it is appended last to the stack and reads the stack's total noise
std in :meth:`CEM.setup`.
"""

from __future__ import annotations

import math
import time
import warnings
from typing import Any, cast

import torch
from torch import Tensor

from splitcem._validate import check_float, check_int
from splitcem.cem.bounds import (
    conditional_entropy_lower_bound,
    feature_entropy_bound,
    mse_lower_bound,
    mutual_information_bound,
    nats_to_bits,
)
from splitcem.cem.kmeans import batched_kmeans, cluster_stats, pad_by_class
from splitcem.cem.loss import Form, cem_loss, objective_from_stats, stored_terms
from splitcem.defenses.base import (
    Defense,
    EpochContext,
    NoiseEntropy,
    SetupContext,
    StepContext,
    register_defense,
)
from splitcem.defenses.cem_bank import FeatureBank, FiniteWatch, collect_pass
from splitcem.errors import ConfigError

__all__ = ["CEM"]

_FORMS = ("paper", "reference")
_BANKS = ("epoch", "pass")


def _check_int(name: str, v: Any, lo: int) -> int:
    return check_int(f"cem {name}", v, lo=lo)


def _check_float(name: str, v: Any, *, positive: bool = False) -> float:
    return check_float(f"cem {name}", v, positive=positive)


@register_defense("cem")
class CEM(Defense):
    """Conditional Entropy Maximisation: ``L = L_D + lambda * L_C`` (Xia et al., CVPR 2025).

    Minimising L_C shrinks each (class, cluster)'s spread of the clean features relative to
    the noise std sigma, which lowers the mixture bound on h(z) and so raises h(x | z), the
    quantity that lower-bounds any inversion attack's MSE. See ``docs/cem.md``.

    Args:
        lam: lambda, the weight of L_C. 0 keeps the mixture fit and the per-epoch bounds
            (a leakage monitor) without regularising. Measured on the full CIFAR-10 CPU
            protocol (50,000 images, 10 epochs, sigma 0.1, paper form, no lr scaling;
            docs/cem.md): 0.1 moved the decoder attack's MSE by +0.9%, 1 by +13% for
            -0.44 accuracy points, 3 by +43% for -0.48 points, 10 by +129% for -3.7 points.
            Start at 3 for a full-size run; short runs on few images need less.
        clusters: K, mixture components per class (reference: 5 for VGG, 15 for ResNet).
        form: ``"paper"`` (per-dimension log(v + sigma^2), the bound's own term; default)
            or ``"reference"`` (scalar-variance hinge of the reference code).
        tau: Hinge threshold as a multiple of sigma^2. Paper form: ``None`` (default) means
            no hinge. Reference form: default 0.125 (0.0625 for TinyImageNet there).
        bank: ``"epoch"`` (default): refit from the clean features of the epoch's own
            training batches (no extra pass; memory train_size x D floats on the device).
            ``"pass"``: the reference's extra pass over the training set in eval mode at
            epoch end (a forward pass over the data, about +50% of an epoch on the CPU
            protocol, docs/cem.md).
        warmup_epochs: Epochs (0-based) before L_C is applied; the mixture is first fitted
            at the end of epoch 0, so 1 (the reference) is the earliest useful value.
        lr_scaling: Multiply lambda by the reference's ``s = 0.001 / lr`` while
            lr > 4.1e-4 (else 1). Off by default: with it a useful lambda depends on the lr
            schedule; plain lambda is what docs/cem.md measured.
        max_iter: Maximum Lloyd iterations per refit (the reference: 50).
        h_x: Optional h(x) in nats of the whole input in [0, 1] pixel units (a *lower*
            bound or an estimate); enables the ``mse_lower_bound`` metric.
        blend_scale: The 10 in the blending weight ``l = min(10 n / (pi L), 0.99)``.
        kmeans_tol: Lloyd stops once at most this fraction of the points changed cluster
            (default 0.1%: the last few flips barely move the variances; 0 = the reference's
            "no change at all", which on real features often runs to ``max_iter``).
        n_init: k-means++ restarts for classes fitted for the first time (best inertia kept);
            later epochs warm-start from the previous centroids and need none.
        seed: Seed of the k-means++ seeding (per epoch ``seed + epoch``: resume-exact).
    """

    #: the epoch's feature bank and finiteness watch travel in epoch_state
    mid_epoch_resumable = True
    # the fitted mixture (persistent buffers, registered in __init__)
    centroids: Tensor  # (C, K, D)
    pi: Tensor  # (C, K)
    var: Tensor  # (C, K, D)
    counts: Tensor  # (C, K)
    fitted: Tensor  # (C,) bool

    def __init__(
        self,
        *,
        lam: float = 0.0,
        clusters: int = 5,
        form: str = "paper",
        tau: float | None = None,
        bank: str = "epoch",
        warmup_epochs: int = 1,
        lr_scaling: bool = False,
        max_iter: int = 50,
        h_x: float | None = None,
        blend_scale: float = 10.0,
        kmeans_tol: float = 1e-3,
        n_init: int = 3,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.lam = _check_float("lambda", lam)
        self.clusters = _check_int("clusters", clusters, 1)
        if form not in _FORMS:
            raise ConfigError(
                f"cem form must be one of {', '.join(map(repr, _FORMS))}, got {form!r}"
            )
        self.form: Form = cast(Form, form)
        if tau is not None:
            tau = _check_float("tau", tau, positive=True)
        elif form == "reference":
            tau = 0.125
        self.tau = tau
        if bank not in _BANKS:
            raise ConfigError(
                f"cem bank must be one of {', '.join(map(repr, _BANKS))}, got {bank!r}"
            )
        self.bank = bank
        self.warmup_epochs = _check_int("warmup_epochs", warmup_epochs, 0)
        if not isinstance(lr_scaling, bool):
            raise ConfigError(f"cem lr_scaling must be true or false, got {lr_scaling!r}")
        self.lr_scaling = lr_scaling
        self.max_iter = _check_int("max_iter", max_iter, 1)
        if h_x is not None:
            try:
                h_x = float(h_x)
            except (TypeError, ValueError):
                raise ConfigError(f"cem h_x must be a number (nats), got {h_x!r}") from None
            if not math.isfinite(h_x):
                raise ConfigError(f"cem h_x must be finite, got {h_x!r}")
        self.h_x = h_x
        self.blend_scale = _check_float("blend_scale", blend_scale, positive=True)
        self.kmeans_tol = _check_float("kmeans_tol", kmeans_tol)
        if self.kmeans_tol >= 1:
            raise ConfigError(f"cem kmeans_tol must be < 1 (a fraction), got {kmeans_tol!r}")
        self.n_init = _check_int("n_init", n_init, 1)
        self.seed = _check_int("seed", seed, 0)

        # run facts, known after setup()
        self._sigma = 0.0
        self._noise_entropy: NoiseEntropy | None = None
        self._num_classes = 0
        self._dim = 0
        self._capacity = 0
        self._input_dim = 0  # d of the MSE bound, read from the first batch
        self._enabled = False
        self._any_fitted = False
        self._stored_terms: Tensor | None = None  # cache of stored_terms(var), (C, K)
        self._bank = FeatureBank(1)  # the epoch's clean features (sized in setup)
        self._watch = FiniteWatch()

        # the fitted mixture: persistent buffers, so it goes into checkpoints
        self.register_buffer("centroids", torch.zeros(0, self.clusters, 0))  # (C, K, D)
        self.register_buffer("pi", torch.zeros(0, self.clusters))  # (C, K)
        self.register_buffer("var", torch.zeros(0, self.clusters, 0))  # (C, K, D)
        self.register_buffer("counts", torch.zeros(0, self.clusters))  # (C, K) samples at the fit
        self.register_buffer("fitted", torch.zeros(0, dtype=torch.bool))  # (C,)

    # ------------------------------------------------------------------ setup
    def setup(self, ctx: SetupContext) -> None:
        """Read sigma, C and D from the run; allocate the mixture buffers on its device."""
        self._sigma = float(ctx.noise_sigma)
        self._noise_entropy = ctx.noise_entropy  # None: Gaussian of sigma
        self._num_classes = int(ctx.num_classes)
        self._dim = int(math.prod(ctx.feature_shape))
        self._capacity = max(1, int(ctx.train_size))
        self._bank = FeatureBank(self._capacity)
        self._enabled = self._sigma > 0
        if not self._enabled and self.lam > 0:
            warnings.warn(
                f"CEM with lambda={self.lam} but the defense stack adds no Gaussian noise "
                "(sigma = 0): the entropy bound is then unbounded and CEM is switched off. "
                "Add a noise defense (e.g. noise: {sigma: 0.1}) before cem.",
                stacklevel=2,
            )
        c, k, d = self._num_classes, self.clusters, self._dim
        dev = torch.device(ctx.device)
        if self.centroids.shape != (c, k, d):
            self.centroids = torch.zeros(c, k, d, device=dev)
            self.pi = torch.zeros(c, k, device=dev)
            self.var = torch.zeros(c, k, d, device=dev)
            self.counts = torch.zeros(c, k, device=dev)
            self.fitted = torch.zeros(c, dtype=torch.bool, device=dev)
            self._any_fitted = False
        else:
            self._mixture_changed()
        self._watch.reset(dev)

    @property
    def sigma(self) -> float:
        """Total noise std of the stack (set by :meth:`setup`)."""
        return self._sigma

    @property
    def is_fitted(self) -> bool:
        """Whether at least one class has a fitted mixture."""
        return self._any_fitted

    # ------------------------------------------------------------------ per step
    def loss(self, ctx: StepContext) -> Tensor | None:
        """Bank the step's clean features; return ``lam * L_C`` once the mixture is fitted."""
        if not self._enabled:
            return None
        z = ctx.z_clean.flatten(1)  # (B, D), graph to the encoder
        y = ctx.y
        if not self._input_dim:
            self._input_dim = int(ctx.x[0].numel())  # shape only: no sync
        if self.bank == "epoch":
            self._bank.add(z.detach(), y)
        if self.lam == 0 or not self._any_fitted or ctx.epoch < self.warmup_epochs:
            self._watch.check(z.detach(), ctx.epoch, ctx.step)
            return None
        # while L_C is active its finiteness check covers z: every sample's deviation enters
        # a sum (masked ones times 0, and NaN * 0 is NaN), so one scalar is checked, not B x D
        l_c = cem_loss(
            z,
            y,
            form=self.form,
            centroids=self.centroids,
            pi=self.pi,
            var=self.var,
            counts=self.counts,
            fitted=self.fitted,
            sigma=self._sigma,
            tau=self.tau,
            blend_scale=self.blend_scale,
            stored_terms=self._get_stored_terms(),
        )
        self._watch.check(l_c.detach().reshape(1, 1), ctx.epoch, ctx.step)
        return self.lam * self._lr_scale(ctx.lr) * l_c

    def _lr_scale(self, lr: float) -> float:
        """The reference's s = 0.001 / lr while lr > 4.1e-4 (else 1), when enabled."""
        if not self.lr_scaling or lr <= 4.1e-4:
            return 1.0
        return 0.001 / lr

    def _get_stored_terms(self) -> Tensor | None:
        if self.form != "paper":
            return None
        if self._stored_terms is None or self._stored_terms.device != self.var.device:
            self._stored_terms = stored_terms(self.var, self._sigma, self.tau)  # (C, K)
        return self._stored_terms

    def _mixture_changed(self) -> None:
        self._stored_terms = None
        self._any_fitted = (
            bool(self.fitted.any()) if self.fitted.numel() else False
        )  # host sync, rare

    # ------------------------------------------------------------------ epoch end
    def epoch_state(self) -> dict[str, Any]:
        """The features banked so far this epoch (copied) and the watch's first bad step."""
        rows = self._bank.rows()
        return {"bank": None if rows is None else (rows[0].clone(), rows[1].clone()),
                "watch": self._watch.state()}

    def load_epoch_state(self, state: dict[str, Any]) -> None:
        self._bank.clear()
        if state.get("bank") is not None:
            z, y = state["bank"]
            self._bank.add(z, y)
        self._watch.load(state.get("watch"))

    def on_epoch_end(self, ctx: EpochContext) -> dict[str, float]:
        """Refit the per-class mixture (warm-started) and report the bounds."""
        if not self._enabled:
            return {}
        t0 = time.perf_counter()
        self._watch.raise_if_bad(ctx.epoch)  # host sync, once per epoch
        if self.bank == "pass":
            z, y, d_in = collect_pass(ctx.model.client, ctx.train_batches, ctx.epoch)
            self._input_dim = self._input_dim or d_in
        else:
            rows = self._bank.rows()
            if rows is None:
                return {}
            z, y = rows
        metrics = self.fit(z, y, epoch=ctx.epoch)
        self._bank.clear()
        metrics["refit_ms"] = 1000.0 * (time.perf_counter() - t0)
        return metrics

    @torch.no_grad()
    def fit(self, z: Tensor, y: Tensor, *, epoch: int = 0) -> dict[str, float]:
        """Refit the mixture on features ``z`` (N, D) with labels ``y`` (N,); return metrics.

        Classes absent from ``z`` keep their previous mixture. Warm start from the stored
        centroids of the classes fitted before; k-means++ for the others.
        """
        c, k = self._num_classes, self.clusters
        z = z.flatten(1).to(self.centroids.device, torch.float32)
        y = y.to(self.centroids.device, torch.long)
        x, mask = pad_by_class(z, y, c)  # (C, M, D), (C, M)
        gen = torch.Generator(device=z.device).manual_seed(self.seed + 1_000_003 * epoch)
        res = batched_kmeans(
            x,
            mask,
            k,
            init=self.centroids,
            init_valid=self.fitted,
            n_init=self.n_init,
            max_iter=self.max_iter,
            tol=self.kmeans_tol,
            generator=gen,
        )
        seen = mask.any(1)  # (C,) classes with samples in this fit; x is scratch
        pi, var, counts = cluster_stats(x, mask, res.centroids, res.assign, overwrite_x=True)
        s = seen.view(c, 1)
        self.centroids.copy_(torch.where(s.unsqueeze(-1), res.centroids, self.centroids))
        self.pi.copy_(torch.where(s, pi, self.pi))
        self.var.copy_(torch.where(s.unsqueeze(-1), var, self.var))
        self.counts.copy_(torch.where(s, counts, self.counts))
        self.fitted |= seen
        self._mixture_changed()
        return self._metrics(res.n_iter, float(res.inertia.sum()))  # host sync, once per epoch

    def bounds(self) -> dict[str, float]:
        """The entropy / leakage bounds of the current mixture (see :mod:`splitcem.cem.bounds`).

        ``h_z_bound_nats``: upper bound on h(z) of the noisy features (whole vector), from the
        mixture of class mixtures weighted by the class frequencies of the last fit;
        ``mi_bound_bits``: upper bound on I(x; z), the h(z) bound minus the entropy of the
        stack's actual noise (Laplace for Laplace LDP), absent when the stack sends what the
        mixture does not model (top-k, dropout); ``mse_lower_bound`` when ``h_x`` is set.
        """
        if not self._any_fitted or not self._sigma > 0:
            return {}
        w = self.counts.sum(1) * self.fitted  # (C,) class frequencies
        h_z = float(feature_entropy_bound(self.pi, self.var, w, self._sigma))
        out = {"h_z_bound_nats": h_z}
        h_eps: float | None = None  # None: Gaussian noise of std sigma
        if self._noise_entropy is not None:
            if self._noise_entropy.per_dim is None:
                return out  # what is sent is not what the mixture models: no I(x; z) bound
            h_eps = self._noise_entropy.per_dim * self._dim
        mi = mutual_information_bound(h_z, self._sigma, self._dim, noise_entropy_nats=h_eps)
        out["mi_bound_bits"] = float(nats_to_bits(mi))
        if self.h_x is not None and self._input_dim:
            h_xz = conditional_entropy_lower_bound(self.h_x, mi)
            out["mse_lower_bound"] = mse_lower_bound(h_xz, self._input_dim)
        return out

    def _metrics(self, n_iter: int, inertia: float) -> dict[str, float]:
        out = self.bounds()
        out["kmeans_iters"] = float(n_iter)
        out["kmeans_inertia"] = inertia
        out["l_c"] = float(
            objective_from_stats(
                self.pi, self.var, self._sigma, form=self.form, tau=self.tau, class_mask=self.fitted
            )
        )
        return out

    # ------------------------------------------------------------------ checkpoints
    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ) -> None:  # type: ignore[no-untyped-def]
        # a checkpoint may be loaded before setup(): take the stored shapes
        for name in ("centroids", "pi", "var", "counts", "fitted"):
            key = prefix + name
            cur = getattr(self, name)
            if key in state_dict and state_dict[key].shape != cur.shape:
                setattr(self, name, torch.empty_like(state_dict[key], device=cur.device))
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        self._mixture_changed()

    def extra_repr(self) -> str:
        lam = f"lam={self.lam}" if self.lam else "lam=0: estimates only, no regularisation"
        return (f"{lam}, clusters={self.clusters}, form={self.form}, tau={self.tau}, "
                f"bank={self.bank}")
