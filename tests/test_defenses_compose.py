"""Every defense composes with noise and CEM in a short real run through the experiment
pipeline (config -> train -> checkpoint -> reload), and the CPU configs are valid."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from splitcem.config import load_config
from splitcem.defenses import list_defenses
from splitcem.experiment import build_defenses, load_trained, run_experiment

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "cpu" / "defenses"
# every registered defense but the two each run composes with: a newly registered defense
# is covered automatically (and needs its pair of CPU configs, see below)
DEFENSES = [d for d in list_defenses() if d not in ("noise", "cem")]
# small / early settings so that two tiny epochs exercise each defense fully
KW = {
    "adversarial": {"width": 8, "depth": 0, "pretrain_epochs": 0, "threshold": 0.0},
    "patrol": {"prune_epoch": 1, "importance_batches": 1},
}


def _cfg(tiny_config, name, **extra):
    return tiny_config(
        data={"limit_train": 64, "limit_test": 64},
        train={"epochs": 2, "batch_size": 32, "milestones": [2], "eval_every": 2},
        defenses=[{"name": name, **KW.get(name, {})}, {"name": "noise", "sigma": 0.1}],
        cem={"lambda": 0.1, "clusters": 2},
        **extra,
    )


@pytest.mark.slow
@pytest.mark.parametrize("name", DEFENSES)
def test_defense_plus_noise_plus_cem_trains_and_reloads(tiny_config, tmp_path, name):
    # PATROL (forward hooks, masks baked into the weights) is also attacked end to end
    attack = name == "patrol"
    cfg = _cfg(tiny_config, name,
               attack={"attacks": [{"name": "decoder", "epochs": 1, "width": 8, "depth": 0}]})
    rec = run_experiment(cfg, tmp_path / "run", attack=attack, progress=False)
    last = rec["train"]["history"][-1]
    assert math.isfinite(rec["train"]["test_accuracy"])
    assert "loss/cem" in last and math.isfinite(last["loss/cem"])  # CEM active in epoch 2
    if name in ("nopeek", "adversarial"):  # the defenses with a loss of their own
        assert math.isfinite(last[f"loss/{name}"])
    if name == "patrol":
        assert last["patrol/pruned_channels"] > 0
        m = rec["attacks"]["attacks"]["decoder"]["metrics"]
        assert all(math.isfinite(m[k]) for k in ("mse", "ssim", "psnr"))
    # the trained run reloads (as the attack step does: before any setup) and deploys
    p = load_trained(tmp_path / "run")
    x = torch.randn(4, 3, 32, 32)
    z = p.stack.transform(p.model.client(x))
    assert z.shape == (4, *p.model.feature_shape) and torch.isfinite(z).all()


def _configs():
    return sorted(CONFIGS.glob("*.yaml"))


def test_every_defense_has_a_cpu_config_with_and_without_cem():
    names = {p.stem for p in _configs()}
    for d in [*DEFENSES, "bottleneck"]:
        assert {d, f"{d}_cem"} <= names, f"configs/cpu/defenses lacks {d}.yaml / {d}_cem.yaml"


@pytest.mark.parametrize("path", _configs(), ids=lambda p: p.stem)
def test_cpu_config_is_valid(path):
    cfg = load_config(path)
    assert cfg.name == path.stem
    build_defenses(cfg)  # every defense hyperparameter is accepted
    assert (cfg.cem is not None and cfg.cem.lam > 0) == path.stem.endswith("_cem")
