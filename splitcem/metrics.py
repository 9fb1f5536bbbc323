"""Reconstruction quality per image: MSE, SSIM and PSNR on images in [0, 1].

Every attack is scored with these: reconstructions and originals are denormalised and
clamped to [0, 1]; each metric is computed **per image** and then averaged over the images
(not over the pixels of the whole set). Per image is the usual definition; the reference
code differs for PSNR, which it computes from each *batch's* mean MSE and then averages over
batches, so its PSNR is not comparable digit for digit (log of a mean is not the mean of logs).

* ``mse(x, y)``: mean of squared differences over (C, H, W).
* ``ssim(x, y)``: Wang et al. 2004 with an 11x11 Gaussian window (sigma 1.5), K1 = 0.01,
  K2 = 0.03, data range 1, population (co)variances, per channel, then the mean over the
  channels. Border handling matches scikit-image's
  ``structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
  data_range=1)``: skimage filters with reflect padding and then drops a 5-pixel strip on
  every side (``crop(S, pad)``); a *valid* convolution produces exactly the kept pixels, so
  we never pad at all (32x32 -> 22x22 SSIM map).
* ``psnr(x, y)``: 10 log10(1 / MSE) per image; MSE is floored at 1e-10 (PSNR <= 100 dB) so
  that a perfect reconstruction does not make the average infinite.

The functional forms validate their inputs (shape, NaN, range) with one host sync per call;
training losses (attack decoders, adversarial training) use the unchecked, differentiable
:func:`ssim_unchecked` instead, which never syncs.
``ImageMetrics`` accumulates over batches in the torchmetrics pattern: pure ``_update`` /
``_compute`` functions plus a small stateful class.

Example:
    >>> x = torch.rand(4, 3, 32, 32)
    >>> image_metrics(x, x)["ssim"]
    1.0
"""

from __future__ import annotations

import math
from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import Tensor

from splitcem.errors import ConfigError, NonFiniteError

__all__ = [
    "HIGHER_IS_BETTER",
    "METRICS",
    "ImageMetrics",
    "image_metrics",
    "mse",
    "psnr",
    "ssim",
    "ssim_unchecked",
]

#: metric names in report order
METRICS: tuple[str, ...] = ("mse", "ssim", "psnr")
#: for the attacker: a lower MSE / higher SSIM / higher PSNR is a better reconstruction
HIGHER_IS_BETTER: dict[str, bool] = {"mse": False, "ssim": True, "psnr": True}

_WIN = 11  # Gaussian window size: 2 * int(truncate * sigma + 0.5) + 1 with truncate 3.5 (skimage)
_SIGMA = 1.5
_K1, _K2 = 0.01, 0.03
_MSE_FLOOR = 1e-10  # PSNR cap of 100 dB
_RANGE_TOL = 1e-5  # float slack for images that were clamped then normalised back and forth


class MetricInputError(ConfigError):
    """Images given to a metric have the wrong shape, are not finite or are not in [0, 1]."""


def _check(x: Tensor, y: Tensor, *, min_size: int = 1) -> None:
    """Validate a pair of image batches; one host sync for the value checks."""
    if not isinstance(x, Tensor) or not isinstance(y, Tensor):
        raise MetricInputError(
            f"metrics take torch tensors, got {type(x).__name__} and {type(y).__name__}"
        )
    if x.shape != y.shape:
        raise MetricInputError(
            f"reconstructions {tuple(x.shape)} and originals {tuple(y.shape)} differ in shape; "
            "pass two (B, C, H, W) batches of the same images"
        )
    if x.dim() != 4:
        raise MetricInputError(
            f"metrics take (B, C, H, W) batches, got shape {tuple(x.shape)}; "
            "add a batch dimension with x.unsqueeze(0)"
        )
    if min(x.shape[-2:]) < min_size:
        raise MetricInputError(
            f"SSIM needs images of at least {min_size}x{min_size} (its Gaussian window), "
            f"got {x.shape[-2]}x{x.shape[-1]}"
        )
    if not x.is_floating_point() or not y.is_floating_point():
        raise MetricInputError(
            f"metrics take float images in [0, 1], got {x.dtype} and {y.dtype}; "
            "convert uint8 images with x.float() / 255"
        )
    if x.numel() == 0:
        return
    # sync point: one .tolist() for all checks
    lo_x, hi_x, lo_y, hi_y = torch.stack(
        [x.amin(), x.amax(), y.amin(), y.amax()]
    ).float().tolist()
    if any(math.isnan(v) or math.isinf(v) for v in (lo_x, hi_x, lo_y, hi_y)):
        raise NonFiniteError(
            "reconstructions or originals contain NaN or inf; check the attack's training loss"
        )
    for what, lo, hi in (("reconstructions", lo_x, hi_x), ("originals", lo_y, hi_y)):
        if lo < -_RANGE_TOL or hi > 1 + _RANGE_TOL:
            raise MetricInputError(
                f"{what} must lie in [0, 1], found values in [{lo:.4g}, {hi:.4g}]; "
                "denormalise with DatasetInfo.denormalize (which clamps) or clamp(0, 1)"
            )


def _mse_per_image(x: Tensor, y: Tensor) -> Tensor:
    """(B, C, H, W) x2 -> (B,) mean squared error, no checks."""
    return (x - y).flatten(1).pow(2).mean(1) if x.shape[0] else x.new_zeros(0)


@lru_cache(maxsize=16)
def _gauss_1d(device: torch.device, dtype: torch.dtype) -> Tensor:
    """The 11-tap normalised Gaussian, sigma 1.5 (scipy.ndimage's gaussian_filter1d)."""
    r = torch.arange(_WIN, dtype=torch.float64) - (_WIN - 1) / 2
    g = torch.exp(-0.5 * (r / _SIGMA) ** 2)
    return (g / g.sum()).to(device=device, dtype=dtype)


def ssim_unchecked(x: Tensor, y: Tensor, data_range: float = 1.0) -> Tensor:
    """Per-image SSIM, (B, C, H, W) x2 -> (B,), without input checks: for training losses.

    The same SSIM as :func:`ssim`, differentiable, in the inputs' dtype, and free of host
    syncs (no shape, range or NaN checks: the caller guarantees (B, C, H, W) images of at
    least 11x11 in a range of ``data_range``). Use :func:`ssim` to score reconstructions.

    The five local statistics (means, second moments, cross moment) of all channels go
    through one grouped, separable valid convolution: (B, 5C, H, W) -> (B, 5C, H-10, W-10).
    """
    b, c = x.shape[:2]
    if b == 0:
        return x.new_zeros(0)
    g = _gauss_1d(x.device, x.dtype)
    stack = torch.cat([x, y, x * x, y * y, x * y], dim=1)  # (B, 5C, H, W)
    k = 5 * c
    stack = F.conv2d(stack, g.view(1, 1, _WIN, 1).expand(k, 1, _WIN, 1), groups=k)
    stack = F.conv2d(stack, g.view(1, 1, 1, _WIN).expand(k, 1, 1, _WIN), groups=k)
    ux, uy, uxx, uyy, uxy = stack.split(c, dim=1)  # each (B, C, H-10, W-10)
    vx = uxx - ux * ux
    vy = uyy - uy * uy
    vxy = uxy - ux * uy
    c1 = (_K1 * data_range) ** 2
    c2 = (_K2 * data_range) ** 2
    s = ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux * ux + uy * uy + c1) * (vx + vy + c2))
    # per channel mean over the map, then mean over channels == mean over (C, H', W')
    return s.flatten(1).mean(1)



def mse(x: Tensor, y: Tensor) -> Tensor:
    """Per-image mean squared error of (B, C, H, W) images in [0, 1] -> (B,)."""
    _check(x, y)
    return _mse_per_image(x, y)


def ssim(x: Tensor, y: Tensor) -> Tensor:
    """Per-image SSIM (Wang et al. 2004, scikit-image semantics) of (B, C, H, W) images in
    [0, 1] -> (B,). Images must be at least 11x11.

    The statistics are computed in float64 where the device supports it (CPU, CUDA), since
    ``E[x^2] - E[x]^2`` loses digits in float32 on flat regions; MPS falls back to float32.
    """
    _check(x, y, min_size=_WIN)
    return ssim_unchecked(_hi(x), _hi(y)).to(x.dtype)


def _hi(x: Tensor) -> Tensor:
    """float64 where the device has it (CPU, CUDA); MPS has no float64."""
    return x.to(torch.float32 if x.device.type == "mps" else torch.float64)


def psnr(x: Tensor, y: Tensor) -> Tensor:
    """Per-image PSNR in dB, 10 log10(1 / MSE), of images in [0, 1] -> (B,) (<= 100 dB)."""
    _check(x, y)
    return _psnr_from_mse(_mse_per_image(x, y))


def _psnr_from_mse(m: Tensor) -> Tensor:
    return -10.0 * torch.log10(m.clamp_min(_MSE_FLOOR))


# ---- accumulation: pure functions + a stateful wrapper (torchmetrics style) ----------------


def _image_metrics_update(recon: Tensor, orig: Tensor) -> tuple[Tensor, int]:
    """One batch -> (sums of per-image [mse, ssim, psnr] as a (3,) float64 tensor, count).

    Stays on the batch's device (no sync besides the input check)."""
    _check(recon, orig, min_size=_WIN)
    r, o = _hi(recon), _hi(orig)
    m = _mse_per_image(r, o)
    s = ssim_unchecked(r, o)
    p = _psnr_from_mse(m)
    sums = torch.stack([m.sum(), s.sum(), p.sum()])
    return sums, recon.shape[0]


def _image_metrics_compute(sums: Tensor, count: int) -> dict[str, float]:
    """(3,) sums and a count -> {mse, ssim, psnr} means. Sync point (``tolist``)."""
    if count == 0:
        raise MetricInputError("no images were scored; give the metric at least one image")
    vals = (sums / count).tolist()
    return dict(zip(METRICS, vals, strict=True))


def image_metrics(recon: Tensor, orig: Tensor) -> dict[str, float]:
    """Mean per-image MSE, SSIM and PSNR of (B, C, H, W) reconstructions against originals.

    Example:
        >>> x = torch.zeros(2, 1, 16, 16); y = torch.full_like(x, 0.1)
        >>> round(image_metrics(x, y)["psnr"], 3)
        20.0
    """
    return _image_metrics_compute(*_image_metrics_update(recon, orig))


class ImageMetrics:
    """Accumulates per-image MSE / SSIM / PSNR over batches; ``compute()`` gives the means.

    ``higher_is_better`` says, per metric, which direction means a *better reconstruction*
    (a stronger attack): lower MSE, higher SSIM and PSNR.

    Example:
        >>> m = ImageMetrics()
        >>> m.update(torch.zeros(2, 1, 16, 16), torch.zeros(2, 1, 16, 16))
        >>> m.compute()["mse"], m.count
        (0.0, 2)
    """

    higher_is_better: dict[str, bool] = HIGHER_IS_BETTER

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._sums: Tensor | None = None
        self.count = 0

    def update(self, recon: Tensor, orig: Tensor) -> None:
        """Add a batch of (B, C, H, W) reconstructions and originals in [0, 1]."""
        sums, n = _image_metrics_update(recon, orig)
        self._sums = sums if self._sums is None else self._sums + sums.to(self._sums.device)
        self.count += n

    def compute(self) -> dict[str, float]:
        """Means over all images seen since the last ``reset``."""
        sums = self._sums if self._sums is not None else torch.zeros(3, dtype=torch.float64)
        return _image_metrics_compute(sums, self.count)
