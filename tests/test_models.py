"""Split models: the reference's tested facts, the registry-driven contract, and errors.

Most tests use small widths so the whole file runs in seconds on a shared CPU; only the
tests pinning the reference's parameter counts build full-width networks.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from splitcem.errors import ConfigError, UnknownNameError
from splitcem.models import MODELS, SplitModel, create_split_model, list_models

SMALL = dict(client_width=0.125, server_width=0.125)


def _params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_registered_models():
    assert list_models() == ["resnet20", "vgg11_bn", "vgg13_bn", "vgg16_bn"]


def test_star_import_matches_all():
    import splitcem.models as models

    ns: dict = {}
    exec("from splitcem.models import *", ns)
    assert set(models.__all__) <= set(ns)


# --- the reference's facts: VGG11-BN cut 4 + C8S1 bottleneck + sigmoid, 85,256 parameters --


def test_vgg11_reference_client():
    """VGG11 cut 4 + C8S1 + sigmoid: (B, 8, 8, 8) for 32x32 and 85,256 client parameters."""
    m = create_split_model("vgg11_bn", num_classes=10)
    assert m.num_client_params() == 85_256
    assert _params(m.client) == 85_256
    z = m.client(torch.randn(2, 3, 32, 32))
    assert z.shape == (2, 8, 8, 8)
    assert m.feature_shape == (8, 8, 8)
    assert z.min() > 0 and z.max() < 1  # sigmoid: strictly inside (0, 1)
    # client = conv64-BN-ReLU, pool, conv128-BN-ReLU, pool, conv 128->8 (no ReLU), sigmoid
    assert isinstance(m.client.bottleneck, nn.Conv2d)
    assert m.client.bottleneck.in_channels == 128 and m.client.bottleneck.out_channels == 8
    assert not any(isinstance(mod, nn.ReLU) for mod in m.client[1:])
    assert isinstance(m.client.activation, nn.Sigmoid)
    # the server starts with a conv 8 -> 128
    first = m.server.decompress[0]
    assert isinstance(first, nn.Conv2d) and (first.in_channels, first.out_channels) == (8, 128)


@pytest.mark.parametrize(
    ("image_size", "in_channels", "expected"),
    [(48, 3, (8, 12, 12)), (64, 3, (8, 16, 16)), (28, 1, (8, 7, 7))],
)
def test_vgg11_feature_shape_per_image_size(image_size, in_channels, expected):
    """8x12x12 for 48x48 (FaceScrub), 8x16x16 for 64x64, 8x7x7 for Fashion-MNIST 28x28."""
    m = create_split_model(
        "vgg11_bn", num_classes=7, in_channels=in_channels, image_size=image_size,
        server_width=0.125,
    )
    assert m.num_client_params() == 85_256 - (3 - in_channels) * 64 * 9
    x = torch.randn(2, in_channels, image_size, image_size)
    assert m.feature_shape == expected
    assert m.client(x).shape == (2, *expected)
    out = m(x)
    assert out.shape == (2, 7) and torch.isfinite(out).all()


def test_vgg_skips_pools_below_1x1():
    """28x28 reaches 1x1 after four pools; the fifth must be skipped, not fail."""
    net = MODELS.create("vgg11_bn", num_classes=10, in_channels=1, image_size=28, width=0.125)
    assert net.sizes[-1] == 1 and net.names[-1] == "pool(skip)"
    assert net(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_resnet20_cut5():
    """ResNet-20 (32/64/128) cut 5 + C8 + sigmoid: stem, stage 1, first block of stage 2."""
    m = create_split_model("resnet20", num_classes=200, image_size=64, cut=5)
    assert m.feature_shape == (8, 32, 32)
    assert m.num_client_params() == 118_952
    z = m.client(torch.randn(2, 3, 64, 64))
    assert z.shape == (2, 8, 32, 32) and z.min() > 0 and z.max() < 1
    assert m.server.decompress[0].out_channels == 64
    assert len(m.server.features) == 5  # the remaining blocks
    assert m(torch.randn(2, 3, 64, 64)).shape == (2, 200)


def test_resnet20_widths_kwarg():
    net = MODELS.create("resnet20", num_classes=10, widths=(16, 32, 64))
    assert net.channels == (16, 16, 16, 16, 32, 32, 32, 64, 64, 64)
    assert net.sizes[-1] == 8
    assert len(net) == 10


# --- the contract every registered model meets (timm style) ---------------------------------


@pytest.mark.parametrize("arch", list_models())
def test_forward_backward(arch):
    m = create_split_model(arch, num_classes=5, cut=3, **SMALL)
    m.train()
    x = torch.randn(2, 3, 32, 32)
    out = m(x)
    assert out.shape == (2, 5)
    assert torch.isfinite(out).all()
    out.sum().backward()
    for name, p in m.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), f"{name} has a non-finite gradient"


@pytest.mark.parametrize("arch", list_models())
def test_same_seed_same_model(arch):
    def build() -> tuple[SplitModel, torch.Tensor]:
        torch.manual_seed(125)
        m = create_split_model(arch, num_classes=3, **SMALL).eval()
        return m, m(torch.ones(1, 3, 32, 32))

    (a, ya), (b, yb) = build(), build()
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb), ka
    assert torch.equal(ya, yb)
    torch.manual_seed(126)
    c = create_split_model(arch, num_classes=3, **SMALL)
    assert not torch.equal(a.client.bottleneck.weight, c.client.bottleneck.weight)


@pytest.mark.parametrize("arch", list_models())
def test_config_rebuilds_model(arch):
    m = create_split_model(arch, num_classes=4, cut=2, bottleneck_stride=2, **SMALL)
    assert m.config["arch"] == arch and m.config["cut"] == 2
    again = create_split_model(**m.config)
    assert again.config == m.config
    again.load_state_dict(m.state_dict())  # strict: same keys and shapes


@settings(max_examples=25, deadline=None)
@given(
    arch=st.sampled_from(list_models()),
    cut_frac=st.floats(0, 1),
    image_size=st.integers(5, 40),
    in_channels=st.sampled_from([1, 3]),
    bottleneck=st.sampled_from([None, 1, 4]),
    stride=st.integers(1, 3),
)
def test_feature_shape_matches_forward(arch, cut_frac, image_size, in_channels, bottleneck, stride):
    """The analytic feature_shape agrees with a forward pass, and the server restores shape."""
    n = len(MODELS.create(arch, num_classes=2, width=0.0625))
    cut = 1 + round(cut_frac * (n - 1))
    m = create_split_model(
        arch, num_classes=2, in_channels=in_channels, image_size=image_size, cut=cut,
        bottleneck_channels=bottleneck, bottleneck_stride=stride if bottleneck else 1,
        client_width=0.0625, server_width=0.0625,
    ).eval()
    x = torch.randn(1, in_channels, image_size, image_size)
    with torch.no_grad():
        z = m.client(x)
        assert tuple(z.shape[1:]) == m.feature_shape
        if bottleneck is not None:
            # the decompression lands exactly on the cut layer's resolution (odd sizes too)
            restored = m.server.decompress(z)
            net = MODELS.create(arch, num_classes=2, image_size=image_size, width=0.0625)
            size = net.sizes[cut - 1]
            assert restored.shape[-2:] == (size, size)
        assert m.server(z).shape == (1, 2)


# --- widths, bottleneck options, activations ------------------------------------------------


def test_widths_change_only_their_side():
    base = create_split_model("vgg11_bn", num_classes=10)
    slim_server = create_split_model("vgg11_bn", num_classes=10, server_width=0.25)
    slim_client = create_split_model("vgg11_bn", num_classes=10, client_width=0.25)
    assert slim_server.num_client_params() == base.num_client_params() == 85_256
    assert slim_client.num_server_params() == base.num_server_params()
    assert slim_server.num_server_params() < base.num_server_params()
    assert slim_client.num_client_params() < base.num_client_params()
    # pinned (our server layout: conv 8->C + BN + ReLU, remaining layers, avg pool + Linear)
    assert base.num_server_params() == 9_164_682
    assert slim_server.num_server_params() == 577_002
    # width 0.25 rounds 64/128 to 16/32 channels
    assert slim_client.client.bottleneck.in_channels == 32
    assert slim_client.server.decompress[0].out_channels == 128
    x = torch.randn(2, 3, 32, 32)
    assert slim_client(x).shape == slim_server(x).shape == (2, 10)


def test_tiny_width_keeps_one_channel():
    m = create_split_model("vgg11_bn", num_classes=2, client_width=1e-3, server_width=1e-3)
    assert m.client.bottleneck.in_channels == 1
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 2)


def test_bottleneck_stride_2_halves_the_map():
    m = create_split_model("vgg11_bn", num_classes=10, bottleneck_stride=2, server_width=0.125)
    assert m.feature_shape == (8, 4, 4)
    x = torch.randn(2, 3, 32, 32)
    z = m.client(x)
    assert z.shape == (2, 8, 4, 4)
    up = m.server.decompress[0]
    assert isinstance(up, nn.ConvTranspose2d) and up.stride == (2, 2)
    assert m.server.decompress(z).shape == (2, 16, 8, 8)  # 128 * 0.125 channels, 8x8 again
    out = m(x)
    assert out.shape == (2, 10) and torch.isfinite(out).all()


def test_no_bottleneck_sends_the_cut_layer():
    m = create_split_model("vgg11_bn", num_classes=10, bottleneck_channels=None, **SMALL)
    assert m.feature_shape == (16, 8, 8)
    assert "bottleneck" not in m.client._modules and "decompress" not in m.server._modules
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # different widths: the server adapts the channel count with a conv
    m = create_split_model(
        "vgg11_bn", num_classes=10, bottleneck_channels=None, client_width=0.25,
        server_width=0.125,
    )
    assert m.server.decompress[0].in_channels == 32 and m.server.decompress[0].out_channels == 16
    assert m(torch.randn(2, 3, 32, 32)).shape == (2, 10)


@pytest.mark.parametrize(
    ("activation", "low", "high"),
    [("sigmoid", 0.0, 1.0), ("tanh", -1.0, 1.0), ("none", -math.inf, math.inf)],
)
def test_activations(activation, low, high):
    m = create_split_model("vgg11_bn", num_classes=10, activation=activation, **SMALL)
    z = m.client(torch.randn(4, 3, 32, 32))
    assert low < z.min() and z.max() < high
    if activation == "none":
        assert isinstance(m.client.activation, nn.Identity)
        assert z.min() < 0  # a raw conv output, no ReLU


def test_bottleneck_relu():
    m = create_split_model("vgg11_bn", num_classes=10, bottleneck_relu=True, **SMALL)
    assert isinstance(m.client.bottleneck_relu, nn.ReLU)
    assert m.client(torch.randn(4, 3, 32, 32)).min() >= 0.5  # sigmoid of ReLU output


def test_initialisation():
    m = create_split_model("vgg11_bn", num_classes=10, server_width=0.25)
    for mod in m.modules():
        if isinstance(mod, nn.BatchNorm2d):
            assert torch.all(mod.weight == 1) and torch.all(mod.bias == 0)
        elif isinstance(mod, (nn.Conv2d, nn.ConvTranspose2d)):
            assert torch.all(mod.bias == 0)
        elif isinstance(mod, nn.Linear):
            assert torch.all(mod.bias == 0)
            assert 0.005 < mod.weight.std().item() < 0.015
    # Kaiming normal, fan_out, relu: std = sqrt(2 / (out_channels * 9))
    w = m.client.features[2][0].weight  # conv 64 -> 128
    assert abs(w.std().item() - math.sqrt(2 / (128 * 9))) < 0.1 * math.sqrt(2 / (128 * 9))


# --- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("arch", "cut", "valid"),
    [("vgg11_bn", 14, "[1, 13]"), ("vgg11_bn", 0, ">= 1"), ("resnet20", 11, "[1, 10]"),
     ("vgg16_bn", 19, "[1, 18]")],
)
def test_bad_cut(arch, cut, valid):
    with pytest.raises(ConfigError, match="cut") as exc:
        create_split_model(arch, num_classes=10, cut=cut, **SMALL)
    assert valid in str(exc.value)


@pytest.mark.parametrize("width", [0, -0.5, float("nan"), float("inf"), "wide"])
@pytest.mark.parametrize("side", ["client_width", "server_width"])
def test_bad_width(side, width):
    with pytest.raises(ConfigError, match=side) as exc:
        create_split_model("vgg11_bn", num_classes=10, **{side: width})
    assert "> 0" in str(exc.value) or "positive" in str(exc.value)


def test_unknown_arch_lists_known():
    with pytest.raises(UnknownNameError) as exc:
        create_split_model("vgg19", num_classes=10)
    msg = str(exc.value)
    assert "vgg19" in msg and all(name in msg for name in list_models())
    assert isinstance(exc.value, ConfigError)


def test_unknown_activation_lists_known():
    with pytest.raises(UnknownNameError, match="sigmoid, tanh") as exc:
        create_split_model("vgg11_bn", num_classes=10, activation="relu")
    assert "none" in str(exc.value)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(num_classes=0), "num_classes"),
        (dict(num_classes=10, cut=2.5), "cut"),
        (dict(num_classes=10, bottleneck_channels=0), "bottleneck_channels"),
        (dict(num_classes=10, bottleneck_stride=0), "bottleneck_stride"),
        (dict(num_classes=10, bottleneck_channels=None, bottleneck_stride=2), "need a bottleneck"),
        (dict(num_classes=10, image_size=0), "image_size"),
        (dict(num_classes=10, in_channels=True), "in_channels"),
    ],
)
def test_bad_values(kwargs, match):
    with pytest.raises(ConfigError, match=match):
        create_split_model("vgg11_bn", **kwargs)
