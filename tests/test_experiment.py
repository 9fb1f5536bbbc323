"""End to end on real data: config -> train -> attack -> run directory, through the CLI too."""

from __future__ import annotations

import json

import pytest
import yaml
from typer.testing import CliRunner

from splitcem.cli import app
from splitcem.errors import ConfigError
from splitcem.experiment import run_experiment


@pytest.mark.slow
def test_run_directory_holds_everything(tiny_config, tmp_path):
    cfg = tiny_config(defenses=[{"name": "noise", "sigma": 0.1}],
                      attack={"attacks": [{"name": "mean_image"},
                                          {"name": "decoder", "epochs": 2, "width": 16,
                                           "depth": 1}]})
    rec = run_experiment(cfg, tmp_path / "run", progress=False)
    run = tmp_path / "run"
    for f in ("config.yaml", "metrics.json", "checkpoints/last.pt", "reconstructions.png",
              "summary.md"):
        assert (run / f).is_file(), f
    on_disk = json.loads((run / "metrics.json").read_text())
    assert on_disk["train"]["epochs"] == 2 and on_disk["noise_sigma"] == 0.1
    # on a CPU both phases record their process's CPU seconds (what --list counts as cost)
    assert on_disk["train"]["cpu_seconds"] == pytest.approx(
        sum(r["cpu_seconds"] for r in on_disk["train"]["history"]))
    assert on_disk["train"]["cpu_seconds"] > 0 and on_disk["attacks"]["cpu_seconds"] > 0
    m = on_disk["attacks"]["attacks"]["decoder"]["metrics"]
    assert 0 < m["mse"] < 1 and -1 <= m["ssim"] <= 1
    # the worst case is taken over both attacks: per metric, the better reconstruction
    both = {k: r["metrics"] for k, r in on_disk["attacks"]["attacks"].items()}
    assert set(both) == {"mean_image", "decoder"} and both["mean_image"] != both["decoder"]
    for metric, pick_best in (("mse", min), ("ssim", max), ("psnr", max)):
        best = pick_best(both, key=lambda k, metric=metric: both[k][metric])
        assert rec["attacks"]["worst"][metric] == {"attack": best, "value": both[best][metric]}
    # the resolved config reloads to the same run
    assert yaml.safe_load((run / "config.yaml").read_text()) == cfg.to_dict()
    summary = (run / "summary.md").read_text()
    assert "test accuracy" in summary and "| decoder |" in summary
    assert "| worst case |" in summary


@pytest.mark.slow
def test_existing_run_needs_resume_or_overwrite(tiny_config, tmp_path):
    cfg = tiny_config(attack={"attacks": []})
    run_experiment(cfg, tmp_path, progress=False)
    with pytest.raises(ConfigError, match="--resume"):
        run_experiment(cfg, tmp_path, progress=False)
    other = tiny_config(attack={"attacks": []}, train={"lr": 0.01})
    with pytest.raises(ConfigError, match="config differs"):
        run_experiment(other, tmp_path, resume=True, progress=False)
    rec = run_experiment(cfg, tmp_path, resume=True, progress=False)  # finished: no-op
    assert rec["train"]["epochs"] == 2
    # a run killed in its first epoch has only the checkpoint written within it: it too is
    # a run to resume (or overwrite), not to start over silently
    ck = tmp_path / "checkpoints"
    (ck / "last.pt").rename(ck / "partial.pt")
    with pytest.raises(ConfigError, match="--resume"):
        run_experiment(cfg, tmp_path, progress=False)
    assert run_experiment(cfg, tmp_path, resume=True, progress=False)["train"]["epochs"] == 2


@pytest.mark.slow
def test_train_run_records_the_epoch_in_flight(tiny_config, tmp_path, monkeypatch):
    """Each checkpoint within an epoch records how far the epoch is (``progress``'s batch,
    batches and seconds: what --list shows of a trial in flight); an epoch's end drops them."""
    import functools

    from splitcem import experiment
    from splitcem.record import RunRecord
    from splitcem.train import Trainer

    monkeypatch.setattr(experiment, "Trainer", functools.partial(Trainer, checkpoint_every=0.0))
    seen = []
    record_within_epoch = RunRecord.record_within_epoch

    def spy(self, batch, batches, seconds, **kw):
        rec = record_within_epoch(self, batch, batches, seconds, **kw)
        seen.append(RunRecord.load(self.path).progress)  # as metrics.json has it
        return rec

    monkeypatch.setattr(RunRecord, "record_within_epoch", spy)
    cfg = tiny_config(train={"epochs": 2, "batch_size": 8, "milestones": [1]},
                      defenses=[{"name": "noise", "sigma": 0.1}], attack={"attacks": []})
    experiment.train_run(cfg, tmp_path, progress=False)
    assert [(p["epoch"], p["batch"], p["batches"]) for p in seen] == [(0, 25, 32), (1, 25, 32)]
    assert "epoch_seconds" not in seen[0] and seen[1]["epoch_seconds"] > 0
    assert seen[1]["epoch_cpu_seconds"] > 0  # on a CPU: the process's CPU time too
    assert all(p["seconds"] > 0 and p["cpu_seconds"] > 0 for p in seen)
    assert RunRecord.load(tmp_path).progress is None  # trained: no epoch in flight


def test_bad_attack_config_fails_before_training(tiny_config, tmp_path):
    cfg = tiny_config(attack={"threat": "setting:inference"})
    with pytest.raises(ConfigError, match="threat setting"):
        run_experiment(cfg, tmp_path / "r", progress=False)
    assert not (tmp_path / "r" / "checkpoints").exists()
    cfg = tiny_config(attack={"attacks": [{"name": "decoder", "epoch": 3}]})
    with pytest.raises(ConfigError, match="'epoch'"):
        run_experiment(cfg, tmp_path / "r", progress=False)


@pytest.mark.slow
def test_cli_train_attack_and_listings(tiny_config, tmp_path):
    cfg_path = tmp_path / "c.yaml"
    cfg_path.write_text(yaml.safe_dump(tiny_config().to_dict()))
    runner = CliRunner()
    out = tmp_path / "r"
    res = runner.invoke(app, ["train", str(cfg_path), "--out", str(out), "-q",
                              "--set", "train.epochs=1", "--set", "train.warmup_epochs=0"])
    assert res.exit_code == 0, res.output
    assert "test accuracy" in res.output
    res = runner.invoke(app, ["attack", str(out), "-q"])
    assert res.exit_code == 0, res.output
    assert "decoder: MSE" in res.output
    # several threat models: every attack under each, the worst case across them
    res = runner.invoke(app, ["attack", str(out), "-q", "--threat", "inference",
                              "--threat", "training"])
    assert res.exit_code == 0, res.output
    assert "decoder@inference/whitebox: MSE" in res.output
    assert "decoder@training/whitebox: MSE" in res.output and "worst case: MSE" in res.output
    rec = json.loads((out / "metrics.json").read_text())
    assert [t["setting"] for t in rec["attacks"]["threats"]] == ["inference", "training"]
    summary = (out / "summary.md").read_text()
    assert "setting inference" in summary and "setting training" in summary
    # attack settings can change after training; the model's cannot
    res = runner.invoke(app, ["attack", str(out), "-q", "--set", "attack.attacks.0.epochs=1"])
    assert res.exit_code == 0, res.output
    rec = json.loads((out / "metrics.json").read_text())
    assert rec["attacks"]["attacks"]["decoder"]["extra"]["params"]["epochs"] == 1
    res = runner.invoke(app, ["attack", str(out), "-q", "--set", "train.epochs=3"])
    assert res.exit_code != 0 and "only attack.* settings" in str(res.exception)
    res = runner.invoke(app, ["defenses"])
    assert res.exit_code == 0 and "noise" in res.output and "cem" in res.output
    res = runner.invoke(app, ["attacks"])
    assert res.exit_code == 0 and "decoder" in res.output


def test_cli_errors_are_one_clear_line(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {epoch: 3}\n")
    p = subprocess.run([sys.executable, "-m", "splitcem.cli", "train", str(bad)],
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    assert "train.epoch: unknown key" in p.stderr and "Traceback" not in p.stderr
