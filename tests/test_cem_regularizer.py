"""The CEM defense end to end on a small real split model: hooks, gradients, checkpoints."""

from __future__ import annotations

import math
import warnings

import pytest
import torch

from splitcem.defenses import (
    DefenseStack,
    EpochContext,
    SetupContext,
    StepContext,
    create_defense,
    list_defenses,
)
from splitcem.defenses.cem import CEM
from splitcem.errors import ConfigError, NonFiniteError

NUM_CLASSES = 4


def _model():
    models = pytest.importorskip("splitcem.models")
    torch.manual_seed(0)
    return models.create_split_model(
        "vgg11_bn", num_classes=NUM_CLASSES, client_width=0.25, server_width=0.25
    )


def _data(n: int = 64, seed: int = 0):
    """Synthetic 32x32 images whose colour depends on the class (so classes differ)."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % NUM_CLASSES
    tint = torch.randn(NUM_CLASSES, 3, 1, 1, generator=g)
    x = tint[y] + 0.5 * torch.randn(n, 3, 32, 32, generator=g)
    return x, y


def _setup(cem: CEM, model, sigma: float = 0.1, train_size: int = 64) -> None:
    cem.setup(
        SetupContext(
            model=model,
            num_classes=NUM_CLASSES,
            device=torch.device("cpu"),
            noise_sigma=sigma,
            train_size=train_size,
            steps_per_epoch=2,
            epochs=3,
            feature_shape=tuple(model.feature_shape),
        )
    )


def _step(cem: CEM, model, x, y, *, epoch: int, step: int, lr: float = 0.05):
    z = model.client(x)
    return cem.loss(
        StepContext(x=x, y=y, z_clean=z, z_sent=z, model=model, epoch=epoch, step=step, lr=lr)
    )


def _epoch_end(cem: CEM, model, epoch: int, x=None, y=None):
    batches = (lambda: iter([(x[:32], y[:32]), (x[32:], y[32:])])) if x is not None else None
    return cem.on_epoch_end(
        EpochContext(model=model, epoch=epoch, device=torch.device("cpu"), train_batches=batches)
    )


def _fitted(lam: float = 1.0, **kw):
    model = _model()
    cem = CEM(lam=lam, clusters=2, **kw)
    _setup(cem, model)
    x, y = _data()
    for i in range(2):  # epoch 0: warm-up, features go to the bank
        assert (
            _step(cem, model, x[32 * i : 32 * (i + 1)], y[32 * i : 32 * (i + 1)], epoch=0, step=i)
            is None
        )
    metrics = _epoch_end(cem, model, 0)
    return cem, model, x, y, metrics


def test_registered_and_validated():
    assert "cem" in list_defenses()
    d = create_defense("cem", lam=0.1, clusters=3, form="reference")
    assert isinstance(d, CEM) and d.tau == 0.125 and d.noise_sigma == 0.0
    assert d.hparams()["lam"] == 0.1


@pytest.mark.parametrize(
    "kw",
    [
        dict(lam=-1.0),
        dict(lam=float("nan")),
        dict(clusters=0),
        dict(clusters=2.5),
        dict(form="fancy"),
        dict(tau=0.0),
        dict(bank="disk"),
        dict(warmup_epochs=-1),
        dict(lr_scaling="yes"),
        dict(max_iter=0),
        dict(h_x="a lot"),
        dict(lam="x"),
    ],
)
def test_bad_values_raise_config_error(kw):
    with pytest.raises(ConfigError, match="cem"):
        CEM(**kw)


def test_sigma_zero_switches_off_with_warning():
    model = _model()
    cem = CEM(lam=0.1)
    with pytest.warns(UserWarning, match="sigma = 0"):
        _setup(cem, model, sigma=0.0)
    x, y = _data(8)
    assert _step(cem, model, x, y, epoch=3, step=0) is None
    assert _epoch_end(cem, model, 0) == {}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _setup(CEM(lam=0.0), model, sigma=0.0)  # lambda 0: nothing to warn about


def test_nonfinite_features_name_the_step():
    model = _model()
    cem = CEM(lam=0.1)
    _setup(cem, model)
    z = torch.rand(4, *model.feature_shape)
    z[1, 0, 0, 0] = float("nan")
    ctx = StepContext(
        x=torch.zeros(4, 3, 32, 32),
        y=torch.zeros(4, dtype=torch.long),
        z_clean=z,
        z_sent=z,
        model=model,
        epoch=2,
        step=7,
        lr=0.1,
    )
    with pytest.raises(NonFiniteError, match=r"epoch 2, step 7"):
        cem.loss(ctx)


def test_nonfinite_features_name_the_step_while_the_loss_is_active():
    cem, model, x, y, _ = _fitted(lam=0.5)
    z = model.client(x[:32]).detach().clone()
    z[3, 0, 0, 0] = float("inf")
    ctx = StepContext(x=x[:32], y=y[:32], z_clean=z, z_sent=z, model=model, epoch=1, step=9,
                      lr=0.1)
    with pytest.raises(NonFiniteError, match=r"epoch 1, step 9"):
        cem.loss(ctx)


def test_epoch_cycle_metrics_and_gradient_only_to_encoder():
    cem, model, x, y, metrics = _fitted(lam=0.5, h_x=-3000.0)
    for key in (
        "h_z_bound_nats",
        "mi_bound_bits",
        "mse_lower_bound",
        "kmeans_iters",
        "refit_ms",
        "l_c",
    ):
        assert key in metrics and math.isfinite(metrics[key]), key
    assert metrics["mi_bound_bits"] > 0 and metrics["mse_lower_bound"] > 0
    assert cem.fitted.all() and cem._bank.n == 0  # bank cleared
    model.zero_grad(set_to_none=True)
    loss = _step(cem, model, x[:32], y[:32], epoch=1, step=2)
    assert loss is not None and loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.client.parameters()]
    assert all(g is not None for g in grads) and sum(g.abs().sum() for g in grads) > 0
    assert all(p.grad is None for p in model.server.parameters())


def test_sgd_on_lc_alone_decreases_it_and_the_leakage_bound():
    cem, model, x, y, m0 = _fitted(lam=1.0)
    opt = torch.optim.SGD(model.client.parameters(), lr=0.05, momentum=0.9)
    first = None
    for step in range(16):
        i = step % 2
        loss = _step(
            cem, model, x[32 * i : 32 * (i + 1)], y[32 * i : 32 * (i + 1)], epoch=1, step=2 + step
        )
        first = float(loss.detach()) if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    last = float(_step(cem, model, x[:32], y[:32], epoch=1, step=99).detach())
    assert last < first - 0.05, (first, last)
    m1 = _epoch_end(cem, model, 1)  # refit on the tightened features
    assert m1["l_c"] < m0["l_c"] and m1["mi_bound_bits"] < m0["mi_bound_bits"]


def test_checkpoint_round_trip_keeps_the_fitted_mixture():
    cem, model, x, y, _ = _fitted(lam=0.3)
    state = DefenseStack([cem]).state_dict()
    assert {
        "defenses.0.centroids",
        "defenses.0.pi",
        "defenses.0.var",
        "defenses.0.counts",
        "defenses.0.fitted",
    } <= set(state)
    with torch.no_grad():
        want = _step(cem, model, x[:16], y[:16], epoch=1, step=5)
    for setup_first in (True, False):
        other = CEM(lam=0.3, clusters=2)
        if setup_first:
            _setup(other, model)
        DefenseStack([other]).load_state_dict(state)
        if not setup_first:
            _setup(other, model)
        assert other.is_fitted
        torch.testing.assert_close(other.centroids, cem.centroids)
        with torch.no_grad():
            got = _step(other, model, x[:16], y[:16], epoch=1, step=5)
        torch.testing.assert_close(got, want)


def test_bank_pass_uses_an_eval_pass_and_restores_train_mode():
    model = _model()
    cem = CEM(lam=0.1, clusters=2, bank="pass")
    _setup(cem, model)
    x, y = _data()
    model.train()
    assert _step(cem, model, x[:32], y[:32], epoch=0, step=0) is None
    assert cem._bank.rows() is None  # nothing banked in pass mode
    metrics = _epoch_end(cem, model, 0, x, y)
    assert model.client.training and cem.fitted.all() and "mi_bound_bits" in metrics


def test_lr_scaling_and_warmup():
    cem, model, x, y, _ = _fitted(lam=1.0, lr_scaling=True, warmup_epochs=2)
    assert _step(cem, model, x[:16], y[:16], epoch=1, step=3) is None  # still warming up
    with torch.no_grad():
        hi = _step(cem, model, x[:16], y[:16], epoch=2, step=4, lr=0.05)  # s = 0.02
        lo = _step(cem, model, x[:16], y[:16], epoch=2, step=4, lr=1e-4)  # s = 1
    torch.testing.assert_close(hi, 0.02 * lo)


def test_reference_form_end_to_end_and_lambda_zero_monitors():
    cem, model, x, y, m = _fitted(lam=0.2, form="reference")
    assert m["l_c"] >= 0
    assert _step(cem, model, x[:16], y[:16], epoch=1, step=2) is not None
    mon, model2, *_, m2 = _fitted(lam=0.0)
    assert "mi_bound_bits" in m2  # lambda 0: bounds only
    assert _step(mon, model2, x[:16], y[:16], epoch=1, step=2) is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_cpu_and_defers_the_nonfinite_check():
    from types import SimpleNamespace

    dev = torch.device("cuda")
    fake = SimpleNamespace(feature_shape=(4, 4, 4))
    g = torch.Generator().manual_seed(0)
    z = torch.rand(600, 64, generator=g)
    y = torch.arange(600) % NUM_CLASSES
    cems = {}
    for where in ("cpu", "cuda"):
        cem = CEM(lam=1.0, clusters=3)
        cem.setup(
            SetupContext(
                model=fake,
                num_classes=NUM_CLASSES,
                device=torch.device(where),
                noise_sigma=0.1,
                train_size=600,
                steps_per_epoch=5,
                epochs=2,
                feature_shape=(4, 4, 4),
            )
        )
        m = cem.fit(z.to(where), y.to(where))
        cems[where] = (cem, m)
    (c_cpu, m_cpu), (c_gpu, m_gpu) = cems["cpu"], cems["cuda"]
    # different RNG streams may seed differently: the fits agree to within a few percent
    assert abs(m_gpu["kmeans_inertia"] / m_cpu["kmeans_inertia"] - 1) < 0.05
    # the same mixture gives the same loss and gradient on both devices
    c_cpu.load_state_dict({k: v.cpu() for k, v in c_gpu.state_dict().items()})
    zb = torch.rand(32, 4, 4, 4, generator=g)
    yb = torch.arange(32) % NUM_CLASSES

    def run(cem, where):
        zz = zb.to(where).requires_grad_(True)
        ctx = StepContext(
            x=torch.zeros(32, 3, 8, 8, device=where),
            y=yb.to(where),
            z_clean=zz,
            z_sent=zz,
            model=fake,
            epoch=1,
            step=3,
            lr=0.1,
        )
        loss = cem.loss(ctx)
        loss.backward()
        return loss.detach().cpu(), zz.grad.cpu()

    l_cpu, g_cpu = run(c_cpu, "cpu")
    l_gpu, g_gpu = run(c_gpu, "cuda")
    torch.testing.assert_close(l_gpu, l_cpu, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(g_gpu, g_cpu, atol=1e-6, rtol=1e-3)
    # a NaN on the GPU does not sync at the step; it is raised at the epoch end
    bad = zb.to(dev).clone()
    bad[0, 0, 0, 0] = float("nan")
    ctx = StepContext(
        x=torch.zeros(32, 3, 8, 8, device=dev),
        y=yb.to(dev),
        z_clean=bad,
        z_sent=bad,
        model=fake,
        epoch=1,
        step=5,
        lr=0.1,
    )
    c_gpu.loss(ctx)  # no raise here
    with pytest.raises(NonFiniteError, match="step 5"):
        c_gpu.on_epoch_end(EpochContext(model=fake, epoch=1, device=dev, train_batches=None))


def test_lambda_zero_describes_itself_as_estimates_only():
    """A run's defenses line does not read as a CEM defense when lambda is 0."""
    assert "estimates only" in CEM(lam=0.0).extra_repr()
    assert CEM(lam=3.0).extra_repr().startswith("lam=3.0, clusters=")
