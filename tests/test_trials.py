"""Grid sweeps on a local Ray: trials run, finished ones are skipped, a killed one resumes,
a failing one is recorded while the others finish; the frontier renders from saved runs."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from splitcem.study.trials import LOOPBACK_ENV, Engine, run_grid

os.environ.update(LOOPBACK_ENV)  # before ray is imported: local Ray on loopback only
ray = pytest.importorskip("ray", reason="pip install 'splitcem[sweep]' (make setup does)")


pytestmark = pytest.mark.slow  # Ray start-up and real (tiny) training: ~40 s in all


def _sweep(tmp, tiny_config, *, failing: bool) -> dict:
    base = tiny_config(train={"epochs": 1, "warmup_epochs": 0}, cem={"lambda": 0.0},
                       model={"client_width": 0.125, "server_width": 0.125},
                       attack={"attacks": [{"name": "decoder", "epochs": 1, "width": 8,
                                            "depth": 1}]},
                       defenses=[{"name": "noise", "sigma": 0.1}])
    (tmp / "base.yaml").write_text(yaml.safe_dump(base.to_dict()))
    variants = [{"name": "noise{sigma}", "grid": {"defenses.0.sigma": [0.1, 0.3]}}]
    if failing:  # valid config, fails at run time: its data is not there
        variants.append({"name": "broken", "set": {"data.root": str(tmp / "no-such-data")},
                         "seeds": [0]})
    return {"name": "tiny", "base": str(tmp / "base.yaml"), "seeds": 2, "variants": variants}


@pytest.fixture(scope="module")
def swept(local_ray, tmp_path_factory, cifar_tar, cache_dir):
    """The 2-trial x 2-seed grid plus one failing trial, run once under Ray."""
    from splitcem.config import load_config

    tmp = tmp_path_factory.mktemp("sweep")

    def tiny_config(**sections):  # the module-scoped twin of conftest's tiny_config
        raw = {"name": "tiny", "seed": 0, "device": "cpu",
               "data": {"name": "cifar10", "root": str(cifar_tar), "limit_train": 256,
                        "limit_test": 128, "cache_dir": str(cache_dir)},
               "train": {"batch_size": 64, "lr": 0.05, "milestones": [2]}}
        for k, v in sections.items():
            raw[k] = {**raw.get(k, {}), **v} if isinstance(v, dict) else v
        return load_config(raw)

    spec = _sweep(tmp, tiny_config, failing=True)
    res = run_grid(spec, out=tmp / "out", engine=Engine(max_concurrent=2, progress=False))
    return spec, res


def test_grid_runs_every_trial_and_records_a_failure(swept):
    _, res = swept
    assert sorted(res.ran) == ["broken_s0", "noise0.1_s0", "noise0.1_s1", "noise0.3_s0",
                               "noise0.3_s1"]
    assert res.failed == ["broken_s0"]
    err = res.statuses["broken_s0"]["error"]
    assert "no-such-data" in err or "not found" in err.lower()
    status = json.loads((res.out / "broken_s0" / "trial.json").read_text())
    assert status["status"] == "failed" and "Traceback" in status["traceback"]
    for name in ("noise0.1_s0", "noise0.3_s1"):
        run = res.out / name
        st = json.loads((run / "trial.json").read_text())
        assert st["status"] == "finished" and st["threads"] == 1
        rec = json.loads((run / "metrics.json").read_text())
        assert rec["attacks"]["worst"]["mse"]["value"] > 0
        assert rec["leakage"]["heldout_bits"] > 0  # the held-out estimate, after the attacks
        cfg = yaml.safe_load((run / "config.yaml").read_text())
        assert cfg["name"] == name and cfg["seed"] == int(name[-1])
    sigmas = {yaml.safe_load((res.out / n / "config.yaml").read_text())["defenses"][0]["sigma"]
              for n in ("noise0.1_s0", "noise0.3_s0")}
    assert sigmas == {0.1, 0.3}
    index = json.loads((res.out / "trials.json").read_text())
    assert {t["name"]: t["status"] for t in index["trials"]}["broken_s0"] == "failed"


def test_rerun_skips_finished_and_resumes_a_killed_trial(swept):
    spec, res = swept
    out = res.out
    ckpts = {n: (out / n / "checkpoints" / "last.pt").stat().st_mtime_ns
             for n in ("noise0.1_s0", "noise0.1_s1", "noise0.3_s0")}
    # noise0.3_s1 was killed during its attack: trained, no attack recorded, status running
    killed = out / "noise0.3_s1"
    rec = json.loads((killed / "metrics.json").read_text())
    rec.pop("attacks")
    (killed / "metrics.json").write_text(json.dumps(rec))
    st = json.loads((killed / "trial.json").read_text())
    (killed / "trial.json").write_text(json.dumps({**st, "status": "running"}))

    again = run_grid(spec, out=out, engine=Engine(max_concurrent=2, progress=False))
    assert sorted(again.skipped) == ["noise0.1_s0", "noise0.1_s1", "noise0.3_s0"]
    assert sorted(again.ran) == ["broken_s0", "noise0.3_s1"]  # failed ones are retried
    for n, t in ckpts.items():
        assert (out / n / "checkpoints" / "last.pt").stat().st_mtime_ns == t, n
    st = json.loads((killed / "trial.json").read_text())
    assert st["status"] == "finished" and st["resumed"] is True and st["attempts"] == 2
    assert json.loads((killed / "metrics.json").read_text())["attacks"]["worst"]


def test_frontier_renders_from_saved_runs_without_rerunning(swept, tmp_path):
    from splitcem.study.frontier_report import write_frontier

    _, res = swept
    runs = tmp_path / "runs"
    shutil.copytree(res.out, runs)
    for ck in runs.rglob("checkpoints"):  # nothing may be re-run or reloaded
        shutil.rmtree(ck)
    rec = write_frontier([runs], tmp_path / "front", n_boot=200)
    assert rec["runs"] == 4 and rec["baseline"] == "noise"
    assert any("broken_s0" in n for n in rec["notes"])  # failed: no metrics, left out
    cells = {c["strength"]: c for c in rec["cells"]}
    assert set(cells) == {0.1, 0.3} and all(c["seeds"] == [0, 1] for c in cells.values())
    md = (tmp_path / "front" / "frontier.md").read_text()
    assert "![frontier](frontier.png)" in md and "<details>" in md
    assert "frontier_reconstructions.png" in md  # same seed, same images: one grid
    for f in ("frontier.png", "frontier.csv", "frontier.json", "frontier_reconstructions.png"):
        assert (tmp_path / "front" / f).stat().st_size > 0, f
    assert len((tmp_path / "front" / "frontier.csv").read_text().splitlines()) == 3  # settings
    assert len((tmp_path / "front" / "frontier_runs.csv").read_text().splitlines()) == 5


def test_adopting_finished_runs_and_the_cli(swept, tmp_path):
    from typer.testing import CliRunner

    from splitcem.cli import app

    spec, res = swept
    src_mtimes = {p: p.stat().st_mtime_ns for p in res.out.rglob("*") if p.is_file()}
    spec = {**spec, "name": "again"}
    adopted = run_grid(spec, out=tmp_path / "adopted",
                       engine=Engine(adopt=(res.out,), use_ray=False, progress=False))
    assert sorted(adopted.adopted) == ["noise0.1_s0", "noise0.1_s1", "noise0.3_s0",
                                       "noise0.3_s1"]
    assert adopted.ran == ["broken_s0"]  # nothing finished to adopt: it ran (and failed)
    st = json.loads((tmp_path / "adopted" / "noise0.3_s0" / "trial.json").read_text())
    assert st["adopted_from"] == str(res.out / "noise0.3_s0")
    assert {p: p.stat().st_mtime_ns for p in res.out.rglob("*") if p.is_file()} == src_mtimes

    sweep_yaml = tmp_path / "again.yaml"
    sweep_yaml.write_text(yaml.safe_dump(spec))
    out = CliRunner().invoke(app, ["sweep", str(sweep_yaml), "--out", str(tmp_path / "adopted"),
                                   "--no-ray", "-q"])
    assert out.exit_code == 0, out.output
    assert "4 already finished" in out.output and "1 failed" in out.output
    assert (tmp_path / "adopted" / "frontier.md").is_file()
