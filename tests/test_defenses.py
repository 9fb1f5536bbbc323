"""Defense contract (every registered defense) and the filter / LDP defenses' own behaviour.

The contract tests are driven by the registry, so a newly registered defense is checked
automatically: shape kept, finite output, gradients reach the encoder, same seed -> same
output, hooks run with default hyperparameters.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F

from splitcem.defenses import (
    Defense,
    DefenseStack,
    EpochContext,
    SetupContext,
    StepContext,
    create_defense,
    list_defenses,
)
from splitcem.defenses.filters import topk_count, topk_mask
from splitcem.defenses.ldp import (
    LocalDP,
    analytic_gaussian_sigma,
    classic_gaussian_sigma,
    clip_norm,
)
from splitcem.errors import ConfigError
from splitcem.models import create_split_model

MEAN = (0.4914, 0.4822, 0.4465)
STD = (0.247, 0.243, 0.261)



@dataclass(frozen=True)
class Active:
    """How to run one registered defense so that every hook it has is active from the first
    step (defaults may switch a loss on later, e.g. after pretraining or CEM's first fit)."""

    params: dict = field(default_factory=dict)
    #: Gaussian noise std the stack reports at setup (CEM switches itself off at 0)
    noise_sigma: float = 0.0
    #: its loss must send a gradient to the encoder (and none to the server)
    loss_reaches_encoder: bool = False
    #: fit CEM's mixture on a first batch, so that L_C applies at step 0
    fit_first: bool = False
    #: metrics its epoch-end hook must report (at the end of epoch 0)
    epoch_metrics: tuple[str, ...] = ()


# one entry per registered defense: test_every_registered_defense_has_settings fails when a
# newly registered defense has none, so the contract below never skips one silently
SETTINGS: dict[str, Active] = {
    "noise": Active({"sigma": 0.1}, noise_sigma=0.1),
    "dropout": Active({"p": 0.2}),
    "topk": Active({"ratio": 0.3}),
    "ldp": Active({"epsilon": 1e4}),
    "nopeek": Active({"weight": 0.3}, loss_reaches_encoder=True),
    "adversarial": Active({"threshold": 0.0, "pretrain_epochs": 0, "width": 8, "depth": 0},
                          loss_reaches_encoder=True, epoch_metrics=("ssim", "penalty")),
    "patrol": Active({"prune_epoch": 1, "importance_batches": 1},
                     epoch_metrics=("pruned_channels",)),
    "cem": Active({"lam": 1.0, "warmup_epochs": 0, "clusters": 2}, noise_sigma=0.1,
                  loss_reaches_encoder=True, fit_first=True,
                  epoch_metrics=("mi_bound_bits", "l_c")),
}


def test_every_registered_defense_has_settings():
    missing = sorted(set(list_defenses()) - set(SETTINGS))
    assert not missing, f"add an entry to SETTINGS in {__file__} for: {missing}"
    assert not set(SETTINGS) - set(list_defenses()), "SETTINGS names an unregistered defense"


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return create_split_model(
        "vgg11_bn", num_classes=10, image_size=16, client_width=0.25, server_width=0.25
    )


def setup_ctx(model, *, noise_sigma: float = 0.0) -> SetupContext:
    return SetupContext(
        model=model, num_classes=10, device=torch.device("cpu"), noise_sigma=noise_sigma,
        train_size=64, steps_per_epoch=4, epochs=3, feature_shape=model.feature_shape,
        mean=MEAN, std=STD,
    )


def batch(seed: int = 1, b: int = 16):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (b,), generator=g)
    return x, y


def build(name: str, seed: int = 0):
    """A tiny model and the defense ``name`` set up with its SETTINGS (CEM fitted)."""
    spec = SETTINGS[name]
    model = tiny_model(seed)
    d = create_defense(name, **spec.params)
    torch.manual_seed(seed)
    d.setup(setup_ctx(model, noise_sigma=spec.noise_sigma))
    if spec.fit_first:
        x, y = batch(seed=99, b=64)
        with torch.no_grad():
            d.fit(model.client(x), y)
    return model, d


@pytest.mark.parametrize("name", list_defenses())
def test_contract_transform(name):
    model, d = build(name)
    x, y = batch()
    for train in (True, False):
        d.train(train)
        model.train(train)
        z = model.client(x)  # (B, 8, 4, 4)
        out = d.transform(z)
        assert out.shape == z.shape
        assert torch.isfinite(out).all()
    # the transform is differentiable: the task gradient reaches the encoder's first conv
    d.train()
    model.train()
    model.zero_grad()
    F.cross_entropy(model.server(d.transform(model.client(x))), y).backward()
    g = model.client.features[0][0].weight.grad
    assert g is not None and torch.isfinite(g).all() and g.abs().sum() > 0


@pytest.mark.parametrize("name", list_defenses())
def test_contract_same_seed_same_output(name):
    outs = []
    for _ in range(2):
        model, d = build(name, seed=3)
        x, y = batch()
        torch.manual_seed(7)
        z = model.client(x)
        zs = d.transform(z)
        t = d.loss(StepContext(x, y, z, zs, model, epoch=0, step=0, lr=0.05))
        outs.append((zs.detach(), None if t is None else t.detach()))
    assert torch.equal(outs[0][0], outs[1][0])
    assert (outs[0][1] is None) == (outs[1][1] is None)
    if outs[0][1] is not None:
        assert torch.equal(outs[0][1], outs[1][1])


@pytest.mark.parametrize("name", list_defenses())
def test_contract_loss_and_epoch_end(name):
    model, d = build(name)
    stack = DefenseStack([d])
    x, y = batch()
    model.train()
    stack.train()
    z = model.client(x)
    zs = stack.transform(z)
    total, terms = stack.loss(StepContext(x, y, z, zs, model, epoch=0, step=0, lr=0.05))
    if total is not None:
        assert total.dim() == 0 and torch.isfinite(total)
        assert all(torch.isfinite(v) for v in terms.values())
    if SETTINGS[name].loss_reaches_encoder:
        assert total is not None and total.requires_grad
        model.zero_grad()
        total.backward()
        grads = [p.grad for p in model.client.parameters()]
        assert all(g is None or torch.isfinite(g).all() for g in grads)
        assert sum(float(g.abs().sum()) for g in grads if g is not None) > 0
        # the loss term trains the encoder only, never the server
        assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.server.parameters())

    def batches():
        for s in range(3):
            yield batch(seed=10 + s)

    out = stack.on_epoch_end(EpochContext(model, epoch=0, device=torch.device("cpu"),
                                          train_batches=batches))
    assert all(isinstance(v, float) and math.isfinite(v) for v in out.values())
    assert {f"{name}/{m}" for m in SETTINGS[name].epoch_metrics} <= set(out), out


def test_cem_contract_runs_with_cem_active():
    """The contract above must exercise L_C, not the switched-off identity (sigma 0)."""
    model, d = build("cem")
    assert d.sigma == 0.1 and d.is_fitted
    x, y = batch()
    z = model.client(x)
    t = d.loss(StepContext(x, y, z, z, model, epoch=0, step=0, lr=0.05))
    assert t is not None and t.requires_grad and float(t.detach()) != 0.0


@pytest.mark.parametrize("name", list_defenses())
def test_contract_match_transform(name):
    """What rMLE matches: ``observed - match_transform(z)`` is zero-mean noise, and exactly
    zero for a defense that adds none (the deterministic transform is reproduced)."""
    model, d = build(name)
    d.eval()
    model.eval()
    torch.manual_seed(5)
    x, _ = batch(b=64)
    with torch.no_grad():
        z = model.client(x)
        obs = d.transform(z)
        m = d.match_transform(z, obs if d.noise_sigma == 0 else None)
    assert m.shape == z.shape
    if d.noise_sigma == 0:
        torch.testing.assert_close(m, obs, atol=0, rtol=0)
    else:  # 64 * 128 draws: the mean is within 5 standard errors of 0
        r = obs - m
        assert abs(float(r.mean())) < 5 * d.noise_sigma / math.sqrt(r.numel())
        assert float(r.std()) == pytest.approx(d.noise_sigma, rel=0.05)


def test_match_transform_of_stacks():
    """In a stack, a random mask hidden by later noise is matched by its expectation; a
    deterministic one (top-k, clipping) exactly."""
    z = torch.rand(256, 8, 4, 4) + 0.1
    drop = DefenseStack([create_defense("dropout", p=0.25), create_defense("noise", sigma=0.1)])
    torch.manual_seed(1)  # not the seed z was drawn with: the mask must not correlate with z
    obs = drop.transform(z)
    torch.testing.assert_close(drop.match_transform(z, obs), 0.75 * z)
    assert float((obs - 0.75 * z).mean()) == pytest.approx(0.0, abs=3e-3)  # zero-mean residual
    alone = DefenseStack([create_defense("dropout", p=0.25)])
    obs = alone.transform(z)
    torch.testing.assert_close(alone.match_transform(z, obs), obs)  # visible zeros: exact
    topk = DefenseStack([create_defense("topk", ratio=0.3), create_defense("noise", sigma=0.1)])
    torch.testing.assert_close(topk.match_transform(z, topk.transform(z)),
                               z * topk_mask(z, 0.3))
    ldp = DefenseStack([create_defense("ldp", clip=1.0)])
    torch.testing.assert_close(ldp.match_transform(z, ldp.transform(z)), clip_norm(z, 1.0, 2))


def test_stack_logs_two_defenses_of_one_type_apart():
    """Two defenses of one type keep their own loss and epoch-end logs."""

    class Const(Defense):
        def __init__(self, v: float) -> None:
            super().__init__()
            self.v = v

        def loss(self, ctx):
            return ctx.z_clean.sum() * 0 + self.v

        def on_epoch_end(self, ctx):
            return {"v": self.v}

    Const.name = "const"
    stack = DefenseStack([Const(1.0), create_defense("noise", sigma=0.0), Const(2.0)])
    assert stack.labels() == ["const#1", "noise", "const#2"]
    model = tiny_model()
    x, y = batch()
    z = model.client(x)
    total, terms = stack.loss(StepContext(x, y, z, z, model, epoch=0, step=0, lr=0.05))
    assert {k: float(v) for k, v in terms.items()} == {"const#1": 1.0, "const#2": 2.0}
    assert total is not None and float(total.detach()) == 3.0
    out = stack.on_epoch_end(EpochContext(model, epoch=0, device=torch.device("cpu"),
                                          train_batches=lambda: iter(())))
    assert out == {"const#1/v": 1.0, "const#2/v": 2.0}


@pytest.mark.parametrize("name", list_defenses())
def test_contract_docstring_one_liner(name):
    from splitcem.defenses import DEFENSES

    line = DEFENSES.doc(name)
    assert line and len(line) <= 100, f"{name}: first docstring line missing or too long"


@pytest.mark.parametrize(
    "name, bad",
    [
        ("dropout", {"p": 1.0}), ("dropout", {"p": -0.1}),
        ("topk", {"ratio": 0.0}), ("topk", {"ratio": 1.5}),
        ("ldp", {"epsilon": 0}), ("ldp", {"clip": -1}), ("ldp", {"delta": 1.0}),
        ("ldp", {"mechanism": "cauchy"}), ("ldp", {"calibration": "classic", "epsilon": 2.0}),
        ("nopeek", {"weight": -1}), ("nopeek", {"weight": float("nan")}),
        ("patrol", {"ratio": 1.0}), ("patrol", {"prune_epoch": 0}), ("patrol", {"scope": "x"}),
        ("adversarial", {"threshold": 1.0}), ("adversarial", {"decoder_steps": 0}),
        ("adversarial", {"features": "noisy"}), ("adversarial", {"decoder_loss": "l1"}),
        ("adversarial", {"width": 2.5}),
    ],
)
def test_invalid_hyperparameters_raise_config_error(name, bad):
    with pytest.raises(ConfigError) as e:
        create_defense(name, **bad)
    key = next(iter(bad))
    assert key in str(e.value) or str(bad[key]) in str(e.value)


# ---------------------------------------------------------------- dropout


def test_dropout_fraction_and_rescale():
    z = torch.rand(64, 8, 8, 8) + 0.1  # strictly positive, so zeros are drops
    torch.manual_seed(0)
    d = create_defense("dropout", p=0.3)
    out = d.train().transform(z)
    frac = (out == 0).float().mean().item()
    assert abs(frac - 0.3) < 0.01  # 32768 Bernoulli draws: std 0.0025
    kept = out != 0
    assert torch.equal(out[kept], z[kept])  # no rescale by default (reference behaviour)
    r = create_defense("dropout", p=0.3, rescale=True).train().transform(z)
    assert torch.allclose(r[r != 0], z[r != 0] / 0.7)
    assert abs(r.mean().item() / z.mean().item() - 1) < 0.02  # expectation preserved


def test_dropout_applies_in_eval_unless_train_only():
    z = torch.rand(8, 8, 4, 4) + 0.1
    assert (create_defense("dropout", p=0.5).eval().transform(z) == 0).any()
    assert torch.equal(create_defense("dropout", p=0.5, train_only=True).eval().transform(z), z)


# ---------------------------------------------------------------- top-k


@pytest.mark.parametrize("ratio, d, k", [(0.3, 10, 3), (0.25, 512, 128), (0.001, 512, 1),
                                         (0.5, 7, 4), (1.0, 5, 5), (0.2, 128, 26)])
def test_topk_count_is_ceil(ratio, d, k):
    assert topk_count(ratio, d) == k


@pytest.mark.parametrize("ratio", [0.05, 0.2, 0.3, 0.5, 0.99])
def test_topk_keeps_exactly_k_largest_per_sample(ratio):
    z = torch.randn(16, 8, 4, 4)  # D = 128, continuous: no ties, no exact zeros
    out = create_defense("topk", ratio=ratio).transform(z)
    flat, zf = out.reshape(16, -1), z.reshape(16, -1)
    k = math.ceil(ratio * 128 - 1e-9)
    assert ((flat != 0).sum(1) == k).all()
    kept = flat != 0
    assert torch.equal(flat[kept], zf[kept])
    # every kept magnitude >= every dropped magnitude, per sample
    for i in range(16):
        a = zf[i].abs()
        assert a[kept[i]].min() >= a[~kept[i]].max()


def test_topk_gradient_is_masked():
    z = torch.randn(4, 8, 2, 2, requires_grad=True)
    out = create_defense("topk", ratio=0.25).transform(z)
    out.sum().backward()
    mask = topk_mask(z, 0.25)
    assert torch.equal(z.grad, mask)


def test_topk_batch_independent():
    z = torch.randn(6, 8, 4, 4)
    t = create_defense("topk", ratio=0.3)
    assert torch.equal(t.transform(z)[:2], t.transform(z[:2]))


# ---------------------------------------------------------------- local DP


@pytest.mark.parametrize("p", [1, 2])
def test_clip_norm_bound(p):
    z = torch.rand(32, 8, 4, 4) * torch.linspace(0.01, 3, 32).view(-1, 1, 1, 1)
    c = 4.0
    out = clip_norm(z, c, p)
    norms = out.reshape(32, -1).norm(p=p, dim=1)
    assert (norms <= c * (1 + 1e-5)).all()
    small = z.reshape(32, -1).norm(p=p, dim=1) <= c
    assert small.any() and (~small).any()
    assert torch.equal(out[small], z[small])  # inside the ball: unchanged
    assert torch.allclose(norms[~small], torch.full_like(norms[~small], c))  # projected


@pytest.mark.parametrize("mechanism", ["laplace", "gaussian"])
def test_ldp_noise_matches_calibration(mechanism):
    eps, clip = 50.0, 2.0
    d = create_defense("ldp", mechanism=mechanism, epsilon=eps, clip=clip)
    z = torch.zeros(64, 8, 8, 8)  # zero vector: clipping is a no-op, output = noise
    torch.manual_seed(0)
    noise = d.transform(z).flatten()  # 32768 draws
    if mechanism == "laplace":
        b = 2 * clip / eps  # L1 sensitivity 2C
        assert d.scale == pytest.approx(b)
        assert noise.abs().mean().item() == pytest.approx(b, rel=0.03)  # E|X| = b
        assert d.noise_sigma == pytest.approx(math.sqrt(2) * b)
    else:
        sigma = analytic_gaussian_sigma(2 * clip, eps, 1e-5)
        assert d.scale == pytest.approx(sigma)
        assert d.noise_sigma == pytest.approx(sigma)
    assert noise.std().item() == pytest.approx(d.noise_sigma, rel=0.03)


def test_ldp_output_is_clipped_vector_plus_noise():
    d = LocalDP(mechanism="gaussian", epsilon=1e6, clip=1.0)  # tiny noise
    z = torch.rand(8, 8, 4, 4) * 5
    out = d.transform(z)
    assert torch.allclose(out, clip_norm(z, 1.0, 2), atol=10 * d.scale)
    assert ((out - clip_norm(z, 1.0, 2)).reshape(8, -1).norm(dim=1) > 0).all()


def test_gaussian_calibrations():
    # classic formula, and analytic <= classic where both apply
    assert classic_gaussian_sigma(1.0, 0.5, 1e-5) == pytest.approx(
        math.sqrt(2 * math.log(1.25 / 1e-5)) / 0.5
    )
    for eps in (0.1, 0.5, 0.9):
        assert analytic_gaussian_sigma(1.0, eps, 1e-5) <= classic_gaussian_sigma(1.0, eps, 1e-5)
    # Balle & Wang (2018): eps = 1, delta = 1e-5 needs sigma ~ 3.73 per unit sensitivity
    assert analytic_gaussian_sigma(1.0, 1.0, 1e-5) == pytest.approx(3.73, abs=0.01)
    # the achieved delta at the returned sigma is <= delta (and the calibration is tight)
    from splitcem.defenses.ldp import _agm_delta

    for eps in (0.3, 1.0, 8.0, 300.0):
        s = analytic_gaussian_sigma(1.0, eps, 1e-5)
        assert _agm_delta(s, eps) <= 1e-5 < _agm_delta(s * 0.999, eps)
    # linear in the sensitivity
    assert analytic_gaussian_sigma(4.0, 2.0, 1e-6) == pytest.approx(
        4 * analytic_gaussian_sigma(1.0, 2.0, 1e-6)
    )
