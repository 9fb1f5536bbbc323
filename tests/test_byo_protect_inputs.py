"""protect: the feature bound, one-line errors for bad inputs, and the same leakage bounds
as the YAML path (the trainer) for stacks whose noise is not one Gaussian."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splitcem
from splitcem.config import TrainConfig
from splitcem.data import BatchLoader
from splitcem.defenses import make_stack
from splitcem.errors import ConfigError, ProtectError
from splitcem.train import Trainer
from tests.test_byo_protect import tiny_model, toy_splits


def relu_encoder() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())


def test_default_bound_is_a_sigmoid_unless_the_encoder_has_one():
    enc = relu_encoder()
    p = splitcem.protect(enc, [{"name": "noise", "sigma": 0.0}])
    x = torch.randn(3, 3, 6, 6) * 5
    with torch.no_grad():
        assert torch.equal(p.eval()(x), torch.sigmoid(enc(x)))
    assert isinstance(p.encoder[-1], nn.Sigmoid)
    assert sorted(p.state_dict()) == sorted([f"client.{k}" for k in enc.state_dict()]
                                            + ["_extra_state"])
    own = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid())
    assert splitcem.protect(own, ["noise"]).encoder is own  # not squashed twice


def test_bound_none_warns_with_the_feature_scale():
    enc = relu_encoder()
    p = splitcem.protect(enc, [{"name": "noise", "sigma": 0.1}], bound="none")
    with pytest.warns(UserWarning, match=r"unbounded \(std .*max \|z\|.*sigma 0.1 is absolute"):
        p(torch.randn(8, 3, 6, 6) * 10)
    with pytest.raises(ConfigError, match="bound must be one of"):
        splitcem.protect(enc, ["noise"], bound="relu")


@pytest.mark.parametrize("labels, match", [
    (torch.tensor([0, 1, 5, 1]), r"\[0, 3\) \(num_classes=3\), found values from 0 to 5"),
    (torch.tensor([0, -1, 2, 1]), r"found values from -1 to 2"),
    (F.one_hot(torch.tensor([0, 1, 2, 1]), 3), "look one-hot.*argmax"),
    (torch.tensor([0.0, 1.0, 2.0, 1.0]), "integer class indices"),
])
def test_bad_labels_fail_at_the_first_step_naming_num_classes(labels, match):
    p = splitcem.protect(relu_encoder(), [{"name": "noise", "sigma": 0.1}], cem=0.5,
                         num_classes=3)
    p.train()
    p(torch.randn(4, 3, 6, 6))
    with pytest.raises(ProtectError, match=match):
        p.loss(labels)


def test_another_image_size_than_at_setup_is_one_line():
    p = splitcem.protect(relu_encoder(), ["noise"])
    p(torch.randn(2, 3, 6, 6))
    with pytest.raises(ProtectError, match="set up for inputs of shape 3 x 6 x 6, got 3 x 8 x 8"):
        p(torch.randn(2, 3, 8, 8))


@pytest.mark.parametrize("cem, match", [
    ({"lamda": 1.0}, r"^cem: unknown key 'lamda'; valid keys: .*lambda"),
    ({"lambda": -1.0}, r"^cem: lambda=-1.0: Input should be greater than or equal to 0$"),
    ({"lambda": 1.0, "clusters": "many"}, r"^cem: clusters='many'"),
])
def test_cem_settings_errors_name_the_key(cem, match):
    with pytest.raises(ConfigError, match=match) as e:
        splitcem.protect(relu_encoder(), ["noise"], cem=cem, num_classes=3)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("defenses", [
    [{"name": "topk", "ratio": 0.5}, {"name": "noise", "sigma": 0.1}],
    [{"name": "ldp", "mechanism": "laplace", "epsilon": 500.0, "clip": 8.0}],
], ids=["topk+noise", "laplace-ldp"])
def test_leakage_bounds_match_the_yaml_path(defenses):
    splits = toy_splits()
    cem = {"lambda": 0.5, "clusters": 2}
    cfg = TrainConfig(epochs=2, batch_size=16, lr=0.05, milestones=[], eval_every=2,
                      amp=False, channels_last=False)
    torch.manual_seed(0)
    ref = tiny_model()
    ref_stack = make_stack(defenses, cem)
    torch.manual_seed(1)
    Trainer(ref, ref_stack, splits, cfg, device=torch.device("cpu"), seed=0, progress=False,
            augment=False).fit()

    torch.manual_seed(0)
    model = tiny_model()
    client = splitcem.protect(model.client, defenses, cem=cem, num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = BatchLoader(splits.train, batch_size=16, shuffle=True, augment=False,
                         device="cpu", seed=0, drop_last=True)
    torch.manual_seed(1)
    for epoch in range(2):
        model.train()
        client.train()
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model.server(client(x)), y) + client.loss(y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        stats = client.epoch_end()
    want = ref_stack.defenses[-1].bounds()
    got = client.defenses.defenses[-1].bounds()
    assert want and got == want
    assert {k for k in stats if "bound" in k} == {f"cem/{k}" for k in want}
    if defenses[0]["name"] == "topk":
        assert "mi_bound_bits" not in got  # top-k sends what the mixture does not model
    else:
        assert "mi_bound_bits" in got
