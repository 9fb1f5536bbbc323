"""``splitcem tune`` on tiny real data (Fashion-MNIST subsets) with a local Ray: the
recommendation respects the budget, warm start pays for nothing already finished, a killed
tune (a real kill of a real process) resumes losing at most the trials in flight, and the
early-stopping rule it learned never stopped a trial that finished within the budget."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from splitcem.study.trials import LOOPBACK_ENV

os.environ.update(LOOPBACK_ENV)  # before ray is imported: local Ray on loopback only
ray = pytest.importorskip("ray", reason="pip install 'splitcem[tune]' (make setup does)")
pytest.importorskip("optuna", reason="pip install 'splitcem[tune]' (make setup does)")

from splitcem.errors import ConfigError  # noqa: E402
from splitcem.record import RunRecord  # noqa: E402
from splitcem.study.tune import run_tune  # noqa: E402

pytestmark = pytest.mark.slow  # Ray start-up and real (tiny) training: ~2 min in all

ROOT = Path(__file__).resolve().parents[1]
SPACE = {"families": {
    "noise": {"set": {"defenses": [{"name": "noise", "sigma": 0.1}],
                      "defenses.0.sigma": {"low": 0.05, "high": 2.0, "log": True},
                      "cem.lambda": 0.0}},
    "cem": {"set": {"defenses": [{"name": "noise", "sigma": 0.1}],
                    "defenses.0.sigma": {"low": 0.05, "high": 2.0, "log": True},
                    "cem.lambda": {"low": 0.3, "high": 30.0, "log": True}}}}}


@pytest.fixture(scope="module")
def base(tmp_path_factory, fashion_dir, cache_dir):
    tmp = tmp_path_factory.mktemp("tune")
    cfg = {"name": "tiny", "seed": 0, "device": "cpu",
           "data": {"name": "fashion_mnist", "root": str(fashion_dir), "limit_train": 512,
                    "limit_test": 256, "cache_dir": str(cache_dir)},
           "model": {"client_width": 0.125, "server_width": 0.125},
           "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "warmup_epochs": 0,
                     "milestones": [2]},
           "attack": {"attacks": [{"name": "decoder", "epochs": 1, "width": 8, "depth": 1}]}}
    (tmp / "base.yaml").write_text(yaml.safe_dump(cfg))
    (tmp / "space.yaml").write_text(yaml.safe_dump(SPACE))
    return tmp


@pytest.fixture(scope="module")
def tuned(base, local_ray):
    return run_tune(base / "base.yaml", max_drop=3.0, space=base / "space.yaml", trials=4,
                    max_concurrent=2, out=base / "first")


def test_recommendation_respects_the_budget(tuned):
    res = tuned
    rep = json.loads((res.out / "tune.json").read_text())
    assert len(res.ran) == 4 and rep["trials"] == 4
    ref = RunRecord.load(res.out / "reference" / "undefended_s0")
    assert ref.finished() and rep["reference_accuracy"] == pytest.approx(ref.accuracy)
    assert rep["budget"] == pytest.approx(ref.accuracy - 0.03)
    feasible = [o for o in res.observations if o.feasible(res.budget)]
    best = rep["recommended"]
    if not feasible:
        assert best is None and "No trial reached the budget" in (res.out / "tune.md").read_text()
        return
    assert best["accuracy"] >= res.budget
    assert best["mse"] == pytest.approx(max(o.mse for o in feasible))
    for d in best["run_dirs"]:  # each is a finished run, ready for export
        rec = RunRecord.load(d)
        assert rec.finished() and rec.accuracy >= res.budget and rec.has_checkpoint
    assert rep["chosen_ready"] and (res.out / "tune.png").stat().st_size > 10_000
    md = (res.out / "tune.md").read_text()
    assert "## Recommended" in md
    assert ("Its accuracy rests on one seed" in md) == (len(best["seeds"]) == 1)


def test_stop_rule_never_stopped_a_trial_within_budget(tuned):
    res = tuned
    runs = [RunRecord.load(o.run_dir).metrics for o in res.observations
            if o.status == "finished"]
    runs.append(RunRecord.load(res.out / "reference" / "undefended_s0").metrics)
    assert res.rule is not None and res.rule.runs == len(runs) >= 2
    assert res.rule.check(runs) == []
    for o in res.observations:
        if o.status == "stopped":  # stopped after epoch 1, below what could reach the budget
            assert o.accuracy + res.rule.margins[1] + res.rule.slack < res.budget


def test_the_confirmation_runs_as_the_tune_was_told(tuned, base, tmp_path, monkeypatch):
    """``--max-concurrent`` and ``--threads-per-trial`` hold for the ``--confirm-seeds``
    runs too (they share the cores with whatever else the machine runs)."""
    import shutil

    from splitcem.study import tune_confirm

    seen: dict = {}
    monkeypatch.setattr(tune_confirm, "confirm",
                        lambda result, space, raw, n, *, engine: seen.update(n=n, engine=engine))
    shutil.copytree(base / "first", tmp_path / "first")
    res = run_tune(base / "base.yaml", max_drop=3.0, space=base / "space.yaml", trials=4,
                   max_concurrent=1, threads_per_trial=2, out=tmp_path / "first", resume=True,
                   confirm_seeds=3)
    assert not res.ran and seen["n"] == 3  # nothing new searched; confirmation asked for
    assert seen["engine"].max_concurrent == 1 and seen["engine"].threads_per_trial == 2


def test_warm_start_skips_finished_configs(tuned, base):
    first = tuned
    before = {o.name: RunRecord.load(o.run_dir).metrics["times"]
              for o in first.observations if o.status == "finished"}
    res = run_tune(base / "base.yaml", max_drop=3.0, space=base / "space.yaml", trials=0,
                   warm_start=[first.out], out=base / "warm")
    warm = [o for o in res.observations if o.source == "warm-start"]
    assert {o.name for o in warm} == set(before) and res.ran == []
    for o in warm:  # adopted (copied), not trained again
        assert RunRecord.load(o.run_dir).metrics["times"] == before[o.name]
    # the undefended reference was adopted from the first tune, not trained again
    ref = RunRecord.load(base / "warm" / "reference" / "undefended_s0")
    assert ref.metrics.get("adopted_from")
    assert json.loads((res.out / "tune.json").read_text())["warm_start"] == len(before)


def _state(out: Path) -> dict:
    try:
        return json.loads((out / "tune_state.json").read_text())
    except (OSError, ValueError):
        return {}


def _trial_status(out: Path, name: str) -> str | None:
    return RunRecord.load(out / "trials" / name).trial.get("status")


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL every process of ``proc``'s session (it was started with a new one) and wait
    until they are gone: Ray's workers have process groups of their own, so a kill of the
    CLI's group alone leaves the trial in flight running."""
    def members() -> list[int]:
        pids = []
        for d in Path("/proc").iterdir():
            try:
                if (d.name.isdigit() and os.getsid(int(d.name)) == proc.pid
                        and (d / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"):
                    pids.append(int(d.name))  # alive (a zombie holds no lock, writes nothing)
            except OSError:  # gone already
                pass
        return pids

    deadline = time.monotonic() + 30
    while (pids := members()) and time.monotonic() < deadline:
        for pid in pids:
            with contextlib.suppress(OSError):  # gone already
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.wait(timeout=30)
        time.sleep(0.1)
    assert not members(), "the killed tune's processes did not exit"


def test_a_killed_tune_resumes(base, tuned, tmp_path):  # tuned: its reference run
    out = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "SPLITCEM_THREADS": "1",
           "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "splitcem.cli", "tune", str(base / "base.yaml"),
           "--max-drop", "3", "--space", str(base / "space.yaml"), "--trials", "3",
           "--max-concurrent", "1", "--out", str(out),
           "--reference", str(base / "first" / "reference")]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:  # kill it when one trial has ended (finished, or stopped by the learned rule) and a
        # later one is running; polled often: a trial the rule stops ends within half a second
        deadline = time.monotonic() + 150
        done: list[str] = []
        while time.monotonic() < deadline and proc.poll() is None:
            names = list(_state(out).get("trials", {}))
            done = [n for n in names if _trial_status(out, n) in ("finished", "stopped")]
            if done and len(names) >= 2 and _trial_status(out, names[-1]) == "running":
                break
            time.sleep(0.02)
        assert proc.poll() is None and done, "the tune ended before it could be killed"
    finally:
        _kill_session(proc)  # the CLI, its Ray and the trial in flight
    names = list(_state(out)["trials"])
    killed = names[-1]
    assert _trial_status(out, killed) == "running"
    first_times = RunRecord.load(out / "trials" / done[0]).metrics["times"]
    with pytest.raises(Exception, match="--resume"):
        run_tune(base / "base.yaml", max_drop=3.0, space=base / "space.yaml", trials=3,
                 out=out, reference=[base / "first" / "reference"])
    with pytest.raises(ConfigError, match="max_drop"):  # another budget: not this tune
        run_tune(base / "base.yaml", max_drop=2.0, space=base / "space.yaml", trials=3,
                 out=out, reference=[base / "first" / "reference"], resume=True)
    res = run_tune(base / "base.yaml", max_drop=3.0, space=base / "space.yaml", trials=3,
                   max_concurrent=1, out=out, reference=[base / "first" / "reference"],
                   resume=True)
    assert done[0] not in res.ran and killed in res.ran  # the finished one is not paid again
    assert RunRecord.load(out / "trials" / done[0]).metrics["times"] == first_times
    assert len(_state(out)["trials"]) == 3 and len(res.observations) == 3
    assert all(o.status in ("finished", "stopped") for o in res.observations)
    assert RunRecord.load(out / "trials" / killed).trial["attempts"] == 2
