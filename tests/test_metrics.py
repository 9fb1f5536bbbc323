"""MSE / SSIM / PSNR against scikit-image (the oracle) on real and random images."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from splitcem.errors import ConfigError, NonFiniteError
from splitcem.metrics import (
    HIGHER_IS_BETTER,
    METRICS,
    ImageMetrics,
    image_metrics,
    mse,
    psnr,
    ssim,
    ssim_unchecked,
)


def sk_ssim(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    """scikit-image's SSIM per image, configured as the paper's (Wang et al. 2004)."""
    return np.array([
        structural_similarity(
            a.double().numpy(), b.double().numpy(), gaussian_weights=True, sigma=1.5,
            use_sample_covariance=False, data_range=1.0, channel_axis=0,
        ) for a, b in zip(x, y, strict=True)
    ])


def sk_psnr(x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return np.array([peak_signal_noise_ratio(b.double().numpy(), a.double().numpy(),
                                             data_range=1.0) for a, b in zip(x, y, strict=True)])


def distort(x: torch.Tensor, seed: int) -> torch.Tensor:
    """A plausible 'reconstruction': blur + noise + contrast change, clamped to [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    blur = torch.nn.functional.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=False)
    return (0.8 * blur + 0.1 + 0.05 * torch.randn(x.shape, generator=g)).clamp(0, 1)


def test_cifar_matches_skimage(cifar_splits):
    x = torch.from_numpy(cifar_splits.eval.images[:24]).permute(0, 3, 1, 2).float() / 255
    y = distort(x, 1)
    np.testing.assert_allclose(ssim(y, x).numpy(), sk_ssim(y, x), atol=1e-3)
    np.testing.assert_allclose(psnr(y, x).numpy(), sk_psnr(y, x), atol=1e-3)
    np.testing.assert_allclose(mse(y, x).numpy(), ((y - x) ** 2).mean((1, 2, 3)).numpy(),
                               rtol=1e-6)
    # two real images against each other, too (low SSIM regime)
    np.testing.assert_allclose(ssim(x[:12], x[12:]).numpy(), sk_ssim(x[:12], x[12:]), atol=1e-3)


def test_lfw_grayscale_matches_skimage():
    from skimage.data import lfw_subset

    x = torch.from_numpy(lfw_subset()[:32]).float().unsqueeze(1)  # (32, 1, 25, 25)
    y = distort(x, 2)
    np.testing.assert_allclose(ssim(y, x).numpy(), sk_ssim(y, x), atol=1e-3)
    np.testing.assert_allclose(psnr(y, x).numpy(), sk_psnr(y, x), atol=1e-3)


@settings(max_examples=25, deadline=None)
@given(
    b=st.integers(0, 3), c=st.sampled_from([1, 3]), h=st.integers(11, 24),
    w=st.integers(11, 24), seed=st.integers(0, 2**16),
)
def test_random_pairs_match_skimage(b, c, h, w, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.rand(b, c, h, w, generator=g)
    y = (x + 0.3 * torch.randn(b, c, h, w, generator=g)).clamp(0, 1)
    s = ssim(x, y)
    assert s.shape == (b,)
    if b:
        np.testing.assert_allclose(s.numpy(), sk_ssim(x, y), atol=1e-3)
        np.testing.assert_allclose(psnr(x, y).numpy(), sk_psnr(x, y), atol=1e-3)
    assert mse(x, y).shape == (b,)


def test_identity_and_constant_images():
    x = torch.rand(3, 3, 16, 16)
    assert torch.allclose(ssim(x, x), torch.ones(3))
    assert torch.equal(mse(x, x), torch.zeros(3))
    assert torch.allclose(psnr(x, x), torch.full((3,), 100.0))  # capped, not inf
    z = torch.zeros(2, 1, 16, 16)
    out = image_metrics(z, torch.full_like(z, 0.1))
    assert out["mse"] == pytest.approx(0.01) and out["psnr"] == pytest.approx(20.0)


def test_float32_path_agrees_with_float64():
    x = torch.rand(4, 3, 32, 32)
    y = (x * 0.5 + 0.25).clamp(0, 1)
    s32 = ssim_unchecked(x, y)
    s64 = ssim_unchecked(x.double(), y.double())
    assert torch.allclose(s32.double(), s64, atol=1e-4)


def test_ssim_loss_is_differentiable():
    x = torch.rand(2, 3, 16, 16, requires_grad=True)
    (1 - ssim_unchecked(x, torch.rand(2, 3, 16, 16)).mean()).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_accumulator_equals_one_shot():
    x, y = torch.rand(10, 3, 16, 16), torch.rand(10, 3, 16, 16)
    m = ImageMetrics()
    for i in range(0, 10, 3):
        m.update(x[i:i + 3], y[i:i + 3])
    one = image_metrics(x, y)
    got = m.compute()
    assert m.count == 10 and list(got) == list(METRICS)
    for k in METRICS:
        assert got[k] == pytest.approx(one[k], rel=1e-9)
    assert one["ssim"] == pytest.approx(ssim(x, y).double().mean().item(), abs=1e-6)
    assert m.higher_is_better == HIGHER_IS_BETTER == {"mse": False, "ssim": True, "psnr": True}
    m.reset()
    with pytest.raises(ConfigError, match="at least one image"):
        m.compute()


@pytest.mark.parametrize(
    ("x", "y", "err", "match"),
    [
        (torch.rand(2, 3, 16, 16), torch.rand(2, 3, 16, 15), ConfigError, "differ in shape"),
        (torch.rand(3, 16, 16), torch.rand(3, 16, 16), ConfigError, r"\(B, C, H, W\)"),
        (torch.rand(1, 1, 16, 16) * 2, torch.rand(1, 1, 16, 16), ConfigError, r"\[0, 1\]"),
        (torch.rand(1, 1, 16, 16), -torch.rand(1, 1, 16, 16) - 0.1, ConfigError, "originals"),
        (torch.full((1, 1, 16, 16), float("nan")), torch.rand(1, 1, 16, 16), NonFiniteError,
         "NaN"),
        (torch.zeros(1, 1, 16, 16, dtype=torch.uint8), torch.zeros(1, 1, 16, 16), ConfigError,
         "float"),
        (torch.rand(1, 1, 8, 8), torch.rand(1, 1, 8, 8), ConfigError, "11x11"),
    ],
)
def test_bad_inputs_raise_clear_errors(x, y, err, match):
    with pytest.raises(err, match=match):
        image_metrics(x, y)


def test_empty_batch():
    e = torch.zeros(0, 3, 16, 16)
    assert mse(e, e).shape == (0,) and ssim(e, e).shape == (0,) and psnr(e, e).shape == (0,)
    with pytest.raises(ConfigError, match="at least one image"):
        image_metrics(e, e)
