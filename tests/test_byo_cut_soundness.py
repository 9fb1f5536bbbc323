"""split's chain check on models whose forward hides things from one input or one mode:
every valid cut is exact in eval and train mode; the others are refused with the reason."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splitcem
from splitcem.errors import CutPointError
from splitcem.models import create_split_model, register_model
from splitcem.models._trace import run_modes
from splitcem.models.registry import MODELS


class Block(nn.Module):
    """conv-BN-ReLU-conv-BN + identity skip: freshly initialised, zeros in give zeros out."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c)

    def forward(self, x):
        return F.relu(x + self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))


class ResCNN(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8),
                                  nn.ReLU())
        self.res1 = Block(8)
        self.drop = nn.Dropout(0.3)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 4)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.drop(self.res1(self.stem(x)))), 1))


class SkipAcross(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 4, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 3, padding=1)
        self.c = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def forward(self, x):
        h = self.a(x)
        return self.c(self.b(h) + h)


class ReusedReLU(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def forward(self, x):
        return self.head(self.relu(self.conv2(self.relu(self.conv1(x)))))


class FunctionalDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))

    def forward(self, x):
        return self.head(F.dropout(self.conv(x), 0.5, self.training))


class Scaled(nn.Module):
    """A container-owned parameter, 1 at init: invisible to any input until trained."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x):
        return self.head(self.conv(x) * self.scale)


def batch() -> torch.Tensor:
    return torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def assert_exact_both_modes(model: nn.Module, at: str) -> None:
    client, server = splitcem.split(model, at=at, example=batch())
    x = batch()
    for want, got in zip(run_modes(model, x, model),
                         run_modes(model, x, lambda v: server(client(v))), strict=True):
        assert torch.equal(want, got)


def test_residual_block_is_one_unit_even_with_a_zero_example():
    model = ResCNN()
    with pytest.warns(UserWarning, match="constant"):
        zeros_cuts = [p.name for p in splitcem.cut_points(model, torch.zeros(2, 3, 8, 8))]
    real_cuts = [p.name for p in splitcem.cut_points(model, batch())]
    assert zeros_cuts == real_cuts
    assert not any(n.startswith("res1.") for n in real_cuts)
    assert "res1" in real_cuts and "stem.2" in real_cuts
    for at in real_cuts:
        assert_exact_both_modes(model, at)
    with pytest.raises(CutPointError, match=r"inside 'res1'.*skip connection or a functional"):
        splitcem.split(model, at="res1.conv1", example=batch())


def test_skip_across_the_cut_is_refused():
    with pytest.raises(CutPointError, match="does not receive the previous child's output"):
        splitcem.split(SkipAcross(), at="a", example=batch())


def test_reused_module_instance_is_refused_in_a_custom_forward():
    with pytest.raises(CutPointError, match="called 2 times"):
        splitcem.split(ReusedReLU(), at="conv1", example=batch())


def test_reused_module_in_a_sequential_is_kept_exactly():
    relu = nn.ReLU()
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), relu, nn.Conv2d(4, 4, 3, padding=1),
                        relu, nn.Flatten(), nn.Linear(4 * 8 * 8, 3))
    client, server = splitcem.split(net, at="2")  # no example: Sequential semantics
    assert [type(m).__name__ for m in server] == ["ReLU", "Flatten", "Linear"]
    x = batch()
    assert torch.equal(server(client(x)), net(x))
    assert_exact_both_modes(net, "2")


def test_functional_dropout_between_children_is_refused_by_the_train_mode_check():
    with pytest.raises(CutPointError, match="train mode"):
        splitcem.split(FunctionalDropout(), at="conv", example=batch())


def test_container_owned_parameter_is_refused():
    with pytest.raises(CutPointError, match=r"owns parameters or buffers itself \(scale\)"):
        splitcem.split(Scaled(), at="conv", example=batch())


def test_dropout_module_in_the_chain_is_exact_in_train_mode():
    model = ResCNN()
    assert_exact_both_modes(model, "res1")
    assert_exact_both_modes(model, "drop")


def test_bn_statistics_and_modes_are_untouched_by_the_check():
    model = ResCNN().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    splitcem.cut_points(model, batch())
    splitcem.split(model, at="res1", example=batch())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert all(m.training for m in model.modules())


def test_real_example_is_kept_without_a_warning():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        splitcem.cut_points(ResCNN(), batch())


@pytest.fixture
def res_registered():
    register_model("res_cnn_test")(lambda *, num_classes=4, in_channels=3: ResCNN())
    yield "res_cnn_test"
    MODELS._entries.pop("res_cnn_test", None)


def test_create_split_model_uses_the_same_check(res_registered):
    with pytest.raises(CutPointError, match="inside 'res1'"):
        create_split_model(res_registered, num_classes=4, image_size=8, cut="res1.conv1",
                           bottleneck_channels=None, activation="none")
    m = create_split_model(res_registered, num_classes=4, image_size=8, cut="res1",
                           bottleneck_channels=None, activation="none")
    assert m.feature_shape == (8, 8, 8)
