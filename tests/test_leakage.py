"""The I(x; z) bound: actual noise entropy (Laplace), n/a for filters, held-out estimate."""

from __future__ import annotations

import json
import math

import pytest
import torch

from splitcem.defenses import DefenseStack, SetupContext, create_defense
from splitcem.defenses.cem import CEM
from splitcem.leakage import mixture_leakage
from splitcem.report import comparison_table, leakage_cell


def test_laplace_noise_entropy_is_the_laplace_one():
    lap = create_defense("ldp", mechanism="laplace", epsilon=1000.0, clip=8.0)
    b = lap.scale
    assert lap.noise_entropy() == pytest.approx(1 + math.log(2 * b))
    gauss_same_var = 0.5 * math.log(2 * math.pi * math.e * lap.noise_sigma**2)
    # less entropy than a Gaussian of the same variance, by 0.5 ln(pi) - 0.5 ~ 0.0724 nats
    assert gauss_same_var - lap.noise_entropy() == pytest.approx(0.5 * math.log(math.pi) - 0.5)
    assert DefenseStack([lap]).noise_entropy().per_dim == pytest.approx(lap.noise_entropy())


def test_gaussian_noises_add_and_filters_have_no_bound():
    st = DefenseStack([create_defense("noise", sigma=0.3), create_defense("noise", sigma=0.4)])
    assert st.noise_entropy().per_dim == pytest.approx(0.5 * math.log(2 * math.pi * math.e * .25))
    for name in ("topk", "dropout"):
        ne = DefenseStack([create_defense(name), create_defense("noise")]).noise_entropy()
        assert ne.per_dim is None and name in ne.note and "does not model" in ne.note
    assert DefenseStack([]).noise_entropy().per_dim is None


def _cem_bounds(stack: DefenseStack, d: int = 6) -> dict[str, float]:
    cem = CEM(lam=1.0, clusters=1)
    cem.setup(SetupContext(model=None, num_classes=2, device=torch.device("cpu"),  # type: ignore[arg-type]
                           noise_sigma=stack.noise_sigma, train_size=40, steps_per_epoch=1,
                           epochs=1, feature_shape=(d, 1, 1),
                           noise_entropy=stack.noise_entropy()))
    g = torch.Generator().manual_seed(0)
    cem.fit(torch.rand(40, d, generator=g), torch.arange(40) % 2)
    return cem.bounds()


def test_cem_figure_subtracts_the_actual_noise_entropy_or_reports_none():
    lap = create_defense("ldp", mechanism="laplace", epsilon=200.0, clip=8.0)
    gauss = create_defense("noise", sigma=lap.noise_sigma)  # same variance
    b_lap, b_gauss = _cem_bounds(DefenseStack([lap])), _cem_bounds(DefenseStack([gauss]))
    assert b_lap["h_z_bound_nats"] == pytest.approx(b_gauss["h_z_bound_nats"])
    # Laplace noise has less entropy: the bound on I(x; z) is higher by D * 0.0724 nats
    diff_bits = 6 * (0.5 * math.log(math.pi) - 0.5) / math.log(2)
    assert b_lap["mi_bound_bits"] - b_gauss["mi_bound_bits"] == pytest.approx(diff_bits)
    topk = _cem_bounds(DefenseStack([create_defense("topk"), create_defense("noise")]))
    assert "h_z_bound_nats" in topk and "mi_bound_bits" not in topk


def test_heldout_plugin_by_hand():
    # one class, one cluster, D = 4: fit points +-1 (centroid exactly 0); held-out points
    # +-a have second moment a^2 about it, so I <= D/2 log2(1 + a^2 / sigma^2)
    d, sigma, a = 4, 0.5, 2.0
    z_fit = torch.cat([torch.ones(5, d), -torch.ones(5, d)])
    z_eval = torch.cat([torch.full((3, d), a), torch.full((3, d), -a)])
    y_fit, y_eval = torch.zeros(10, dtype=torch.long), torch.zeros(6, dtype=torch.long)
    h_eps = 0.5 * math.log(2 * math.pi * math.e * sigma**2)
    out = mixture_leakage(z_fit, y_fit, z_eval, y_eval, num_classes=1, clusters=1, sigma=sigma,
                          noise_entropy_per_dim=h_eps)
    assert out["heldout_bits"] == pytest.approx(d / 2 * math.log2(1 + a * a / sigma**2))
    assert out["fit_bits"] == pytest.approx(d / 2 * math.log2(1 + 1 / sigma**2))


def test_reports_show_heldout_estimate_or_na_with_reason():
    held = {"name": "a", "leakage": {"heldout_bits": 412.4}, "cem": {"mi_bound_bits": 300.0}}
    assert leakage_cell(held) == "412 (held-out)"
    assert leakage_cell({"cem": {"mi_bound_bits": 300.0}}) == "300 (train)"
    topk = {"name": "t", "leakage_note": "topk: what is sent is topk(z) + noise, ...",
            "cem": {"h_z_bound_nats": 1.0}}
    assert leakage_cell(topk).startswith("n/a (topk:")
    table = comparison_table([held, topk])
    assert "412 (held-out)" in table and "n/a (topk" in table


@pytest.mark.slow
def test_leakage_only_on_an_existing_run(tiny_config, tmp_path):
    from typer.testing import CliRunner

    from splitcem.cli import app
    from splitcem.experiment import leakage_run, run_experiment

    cfg = tiny_config(defenses=[{"name": "noise", "sigma": 0.1}], cem={"lambda": 0.0},
                      train={"epochs": 1, "warmup_epochs": 0}, attack={"attacks": []})
    run_experiment(cfg, tmp_path / "r", progress=False)
    before = (tmp_path / "r" / "metrics.json").read_text()
    est = leakage_run(tmp_path / "r", write=False)  # read only
    assert (tmp_path / "r" / "metrics.json").read_text() == before
    assert est["heldout_bits"] > 0 and est["heldout_images"] == 128 and est["eval_mode"]
    res = CliRunner().invoke(app, ["attack", str(tmp_path / "r"), "--leakage-only"])
    assert res.exit_code == 0, res.output
    rec = json.loads((tmp_path / "r" / "metrics.json").read_text())
    assert rec["leakage"]["heldout_bits"] == pytest.approx(est["heldout_bits"])
    assert "held-out" in (tmp_path / "r" / "summary.md").read_text()


@pytest.mark.slow
def test_tensorboard_option(tiny_config, tmp_path, monkeypatch):
    import sys

    from splitcem.errors import ConfigError
    from splitcem.experiment import train_run

    cfg = tiny_config(train={"epochs": 1, "warmup_epochs": 0, "tensorboard": True},
                      attack={"attacks": []})
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # not installed
    with pytest.raises(ConfigError, match=r"splitcem\[tensorboard\]"):
        train_run(cfg, tmp_path / "no", progress=False)
    assert not (tmp_path / "no" / "checkpoints").exists()  # failed before training
    monkeypatch.undo()
    pytest.importorskip("tensorboard", reason="pip install 'splitcem[tensorboard]'")
    train_run(cfg, tmp_path / "tb", progress=False)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(tmp_path / "tb" / "tensorboard"))
    ea.Reload()
    assert {"train_loss", "train_accuracy", "test_accuracy"} <= set(ea.Tags()["scalars"])
    assert [e.step for e in ea.Scalars("train_loss")] == [1]
