"""NoPeek: the distance correlation against a slow, obvious oracle, and its effect in training."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from splitcem.defenses import DefenseStack, create_defense
from splitcem.defenses.nopeek import distance_correlation


def dcor_oracle(x: np.ndarray, z: np.ndarray) -> float:
    """Distance correlation by the textbook definition, with explicit O(n^2) loops."""
    n = x.shape[0]
    x = x.reshape(n, -1).astype(np.float64)
    z = z.reshape(n, -1).astype(np.float64)

    def centred(v):
        d = [[math.sqrt(sum((v[i, k] - v[j, k]) ** 2 for k in range(v.shape[1])))
              for j in range(n)] for i in range(n)]
        row = [sum(d[i]) / n for i in range(n)]
        col = [sum(d[i][j] for i in range(n)) / n for j in range(n)]
        tot = sum(row) / n
        return [[d[i][j] - row[i] - col[j] + tot for j in range(n)] for i in range(n)]

    a, b = centred(x), centred(z)
    dcov2 = sum(a[i][j] * b[i][j] for i in range(n) for j in range(n)) / n**2
    dvx = sum(a[i][j] ** 2 for i in range(n) for j in range(n)) / n**2
    dvz = sum(b[i][j] ** 2 for i in range(n) for j in range(n)) / n**2
    if dvx * dvz == 0:
        return 0.0
    return math.sqrt(max(dcov2, 0.0) / math.sqrt(dvx * dvz))


@pytest.mark.parametrize("n, dx, dz", [(2, 3, 2), (3, 5, 1), (8, 12, 4), (17, 6, 9)])
def test_matches_oracle(n, dx, dz):
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    z = torch.randn(n, dz, generator=g, dtype=torch.float64) + 0.5 * x[:, :1]
    torch.testing.assert_close(
        distance_correlation(x, z).item(), dcor_oracle(x.numpy(), z.numpy()),
        atol=1e-9, rtol=1e-9,
    )


@settings(max_examples=25, deadline=None)
@given(n=st.integers(2, 9), dx=st.integers(1, 6), dz=st.integers(1, 6),
       seed=st.integers(0, 2**16), dup=st.booleans())
def test_matches_oracle_hypothesis(n, dx, dz, seed, dup):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dx, generator=g, dtype=torch.float64)
    z = torch.rand(n, dz, generator=g, dtype=torch.float64)
    if dup:  # duplicate rows: zero distances off the diagonal
        x[-1], z[-1] = x[0], z[0]
    torch.testing.assert_close(
        distance_correlation(x, z).item(), dcor_oracle(x.numpy(), z.numpy()),
        atol=1e-8, rtol=1e-8,
    )


def test_float32_images_match_oracle():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(16, 3, 8, 8, generator=g)  # like normalised images
    z = torch.sigmoid(torch.randn(16, 8, 2, 2, generator=g) + x[:, :1, :2, :2])
    torch.testing.assert_close(
        distance_correlation(x, z).item(), dcor_oracle(x.numpy(), z.numpy()),
        atol=1e-5, rtol=1e-4,
    )


def test_edge_cases():
    x = torch.randn(2, 5)
    z = torch.randn(2, 3, requires_grad=True)
    assert distance_correlation(x, z).item() == pytest.approx(1.0)  # B = 2: always 1
    # constant features: defined as 0, and the gradient is 0, not NaN
    zc = torch.full((6, 4), 0.5, requires_grad=True)
    d = distance_correlation(torch.randn(6, 5), zc)
    d.backward()
    assert d.item() == 0.0 and torch.equal(zc.grad, torch.zeros_like(zc))
    # duplicate rows and B = 2: finite gradients
    zd = torch.randn(5, 3)
    zd[1] = zd[0]
    zd.requires_grad_(True)
    distance_correlation(torch.randn(5, 4), zd).backward()
    assert torch.isfinite(zd.grad).all()
    distance_correlation(x, z).backward()
    assert torch.isfinite(z.grad).all()
    # invariances: scale and shift of either side
    x, z = torch.randn(10, 4, dtype=torch.float64), torch.randn(10, 2, dtype=torch.float64)
    torch.testing.assert_close(distance_correlation(3 * x + 1, z - 2), distance_correlation(x, z))
    with pytest.raises(ValueError):
        distance_correlation(torch.randn(1, 3), torch.randn(1, 2))


def test_gradient_lowers_dcor():
    # optimising z alone on the loss drives dCor(x, z) down (0.80 -> 0.38 here)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(32, 20, generator=g)
    z = (x[:, :4] + 0.1 * torch.randn(32, 4, generator=g)).requires_grad_(True)
    start = distance_correlation(x, z).item()
    opt = torch.optim.Adam([z], lr=0.1)
    for _ in range(50):
        opt.zero_grad()
        distance_correlation(x, z).backward()
        opt.step()
    assert distance_correlation(x, z).item() < start - 0.3


def _images(ds, n):
    """First ``n`` images of ``ds``, average-pooled to 16x16 and normalised; labels."""
    x01 = torch.as_tensor(ds.images[:n]).permute(0, 3, 1, 2).float() / 255
    return ds.info.normalize(F.avg_pool2d(x01, 2)), torch.as_tensor(ds.labels[:n])


@pytest.mark.slow
def test_nopeek_lowers_distance_correlation_in_training(cifar_splits):
    """A short run on real images (256 CIFAR-10 training images pooled to 16x16, 3 epochs)
    with NoPeek ends with a lower distance correlation between held-out images and their
    features than the same run without it."""
    from splitcem.defenses import SetupContext, StepContext
    from splitcem.models import create_split_model

    x, y = _images(cifar_splits.train, 256)
    x_test, _ = _images(cifar_splits.test, 128)

    def final_dcor(weight: float) -> float:
        torch.manual_seed(0)
        model = create_split_model("vgg11_bn", num_classes=10, image_size=16,
                                   client_width=0.25, server_width=0.25)
        stack = DefenseStack([create_defense("nopeek", weight=weight)])
        stack.setup(SetupContext(model, 10, torch.device("cpu"), 0.0, 256, 4, 3,
                                 model.feature_shape))
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for epoch in range(3):
            for i in range(0, 256, 64):
                xb, yb = x[i:i + 64], y[i:i + 64]
                z = model.client(xb)
                extra, _ = stack.loss(StepContext(xb, yb, z, z, model, epoch, 0, 0.05))
                loss = F.cross_entropy(model.server(z), yb)
                loss = loss if extra is None else loss + extra
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        with torch.no_grad():
            return distance_correlation(x_test, model.client(x_test)).item()

    plain, defended = final_dcor(0.0), final_dcor(2.0)
    assert defended < plain - 0.1, (plain, defended)
