"""The run record: a result belongs to the config (and numeric path, and aux / eval partition)
it finished with; a stale file never passes as a result; the committed runs adopt honestly."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from splitcem.config import load_config
from splitcem.record import RunRecord, attack_hash, train_hash
from splitcem.study.trials import Engine

REPO = Path(__file__).resolve().parents[1]
COMMITTED = REPO / "results" / "cifar10_cpu"
#: the trials one after another in this process, no progress bars
LOOP = Engine(use_ray=False, progress=False)


def _legacy_run(tmp: Path, cfg: dict, metrics: dict) -> Path:
    run = tmp / cfg["name"]
    run.mkdir(parents=True)
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    (run / "metrics.json").write_text(json.dumps(metrics))
    return run


def _raw(name: str, seed: int, **train) -> dict:
    return {"name": name, "seed": seed, "device": "cpu",
            "train": {"epochs": 2, "amp": False, "channels_last": False, **train},
            "attack": {"attacks": [{"name": "decoder", "epochs": 1}]}}


def test_an_attack_without_amp_hashes_the_path_its_decoder_trains_on(monkeypatch):
    """A decoder spec that leaves ``amp`` out runs ``auto`` (bf16 where it is native): its
    hash differs between a bf16 machine and one without; an explicit false does not."""
    import torch

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    implicit = load_config({**_raw("a", 125), "attack": {"attacks": [{"name": "decoder"}]}})
    explicit = load_config({**_raw("a", 125), "attack": {"attacks": [
        {"name": "decoder", "amp": False}], "threat": implicit.attack.threat}})
    hashes = {}
    for bf16 in (True, False):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=bf16: v,
                            raising=False)
        num = {"amp": False, "channels_last": True}  # training's path, recorded
        hashes[bf16] = (attack_hash(implicit, device="cpu", numerics=num),
                        attack_hash(explicit, device="cpu", numerics=num))
    assert hashes[True][0] != hashes[False][0] and hashes[True][1] == hashes[False][1]
    assert hashes[False][0] == hashes[False][1]  # auto resolved to float32 = explicit false


def test_split_seed_is_fixed_across_seeds_and_legacy_configs_load():
    import numpy as np

    from splitcem.data import ArrayDataset
    from splitcem.data.info import DatasetInfo
    from splitcem.data.splits import split_aux

    raw = _raw("a", 126)
    assert load_config(raw).data.split_seed == 125  # absent key: the fixed default
    assert load_config({**raw, "data": {"split_seed": None}}).data.split_seed is None
    # training does not depend on the partition: same training hash, another attack hash
    a, b = load_config(raw), load_config({**raw, "data": {"split_seed": 7}})
    assert train_hash(a) == train_hash(b) and attack_hash(a) != attack_hash(b)
    info = DatasetInfo("x", 2, 1, 1, (0.5,), (0.5,), ("a", "b"))
    ds = ArrayDataset(np.arange(50, dtype=np.uint8).reshape(50, 1, 1, 1), np.arange(50) % 2,
                      info)
    held = [split_aux(ds, seed=s)[1].images.ravel().tolist() for s in (125, 125, 126)]
    assert held[0] == held[1] != held[2] and len(held[0]) == 5


def test_legacy_records_read_as_before_and_say_their_split(tmp_path):
    done = {"train": {"epochs": 2, "test_accuracy": 0.5},
            "attacks": {"attacks": {"decoder": {"metrics": {"mse": 0.01}}}}}
    r125 = RunRecord.load(_legacy_run(tmp_path, _raw("s125", 125), done))
    r126 = RunRecord.load(_legacy_run(tmp_path, _raw("s126", 126), done))
    half = RunRecord.load(_legacy_run(tmp_path, _raw("half", 125),
                                      {"train": {"epochs": 1}}))
    assert r125.legacy and r125.status == "attacked" and r125.finished()
    assert half.status == "training" and not half.finished()
    assert half.unfinished() == "unfinished (trained 1 of 2 epochs)"
    assert r125.split["seed"] == 125 and r126.split["seed"] == 126  # the run's own seed
    # a fixed-split (125) trial: the seed-125 run is its result; the seed-126 run was
    # attacked on another partition and has no checkpoint, so it is not
    assert r125.finished(load_config(_raw("trial", 125)))
    assert r126.trained_for(load_config(_raw("trial", 126)))
    assert not r126.finished(load_config(_raw("trial", 126)))
    # explicit split_seed: null asks for the old partition, and then it is the same result
    assert r126.finished(load_config({**_raw("t", 126), "data": {"split_seed": None}}))


def test_what_ran_is_compared_not_the_words(tmp_path):
    done = {"device": "cpu", "train": {"epochs": 2},
            "numerics": {"device": "cpu", "amp": True, "channels_last": True},
            "attacks": {"attacks": {"decoder": {"metrics": {"mse": 0.01}}}}}
    rec = RunRecord.load(_legacy_run(tmp_path, _raw("r", 125, amp="auto",
                                                    channels_last="auto"), done))
    explicit = load_config(_raw("t", 125, amp=True, channels_last=True))
    assert rec.finished(explicit)  # auto resolved to bf16 + channels-last where it ran
    assert not rec.finished(load_config(_raw("t", 125, amp=False, channels_last=True)))


@pytest.mark.slow
def test_a_changed_trial_killed_mid_training_is_rerun_never_reported(tiny_config, tmp_path):
    """A real kill of a real process: the trial's config changed (sigma 0.1 -> 0.3) and its
    re-run died during training; the old results must not pass as the new trial's."""
    from splitcem.study.frontier_report import find_runs
    from splitcem.study.grid import Trial
    from splitcem.study.trials import run_trials

    small = {"model": {"client_width": 0.125, "server_width": 0.125},
             "attack": {"attacks": [{"name": "decoder", "epochs": 1, "width": 8, "depth": 1}]}}
    old = tiny_config(name="t", defenses=[{"name": "noise", "sigma": 0.1}],
                      train={"epochs": 4, "warmup_epochs": 0}, **small)
    res = run_trials([Trial("t", old, 0)], tmp_path / "sweep", engine=LOOP)
    run = tmp_path / "sweep" / "t"
    assert res.ran == ["t"] and RunRecord.load(run).finished(old)

    new = tiny_config(name="t", defenses=[{"name": "noise", "sigma": 0.3}],
                      train={"epochs": 4, "warmup_epochs": 0}, **small)  # only sigma differs
    code = ("import sys, json; from splitcem.study.execute import run_trial; "
            "run_trial(json.loads(sys.argv[1]), sys.argv[2], threads=1)")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-c", code, json.dumps(new.to_dict()), str(run)],
                            env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and proc.poll() is None:
            if RunRecord.load(run).progress is not None:  # an epoch of the new config is done
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the re-run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    rec = RunRecord.load(run)
    assert rec.status == "training" and rec.config.defenses[0]["sigma"] == 0.3
    assert "attacks" not in rec.metrics  # the old attacks are gone, not relabelled
    assert not rec.finished(new) and not rec.finished(old)
    runs, notes = find_runs([tmp_path / "sweep"])
    assert runs == [] and any("unfinished (training)" in n for n in notes)
    # its checkpointed epochs are recorded: --list shows them, estimates the rest from them
    from splitcem.study.listing import list_trials

    prog = rec.progress
    assert prog is not None and prog["of"] == 4 and 1 <= prog["epoch"] < 4
    st, = list_trials([Trial("t", new, 0)], tmp_path / "sweep", device="cpu")
    assert st.state == "pending" and f"epoch {prog['epoch']}/4 done" in st.note, st.note
    # at its last epoch's core-seconds: the CPU time it recorded on this CPU
    assert st.train_left == pytest.approx((4 - prog["epoch"]) * prog["epoch_cpu_seconds"])
    assert st.train_left > 0

    again = run_trials([Trial("t", new, 0)], tmp_path / "sweep", engine=LOOP)
    assert again.ran == ["t"] and again.statuses["t"]["status"] == "finished"
    assert again.statuses["t"]["resumed"] is True  # the killed run's own checkpoint
    done = RunRecord.load(run)
    assert done.finished(new) and done.metrics["train"]["epochs"] == 4
    assert "progress" not in done.metrics and done.progress is None
    assert done.attacks["split"]["seed"] == 125
    # the record says what made it: the changed config's fresh start (the old run's entries
    # went with its results), the resume after the kill, the attacks
    assert [e["phase"] for e in done.metrics["made_by"]] == ["train", "resume", "attacks"]


def test_a_trial_waits_for_a_worker_still_running_it(tiny_config, tmp_path, caplog):
    """A worker of a killed sweep may still be running a trial when the sweep is resumed:
    the new attempt waits for that process's lock instead of writing beside it, then counts
    the attempt after the other one's."""
    from splitcem.record import LOCK_FILE
    from splitcem.study.execute import run_trial

    run = tmp_path / "t"
    run.mkdir()
    (run / "trial.json").write_text(json.dumps({"status": "running", "attempts": 1}))
    code = ("import sys, time; from filelock import FileLock; l = FileLock(sys.argv[1]); "
            "l.acquire(); print('held', flush=True); time.sleep(float(sys.argv[2]))")
    holder = subprocess.Popen([sys.executable, "-c", code, str(run / LOCK_FILE), "2"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        cfg = tiny_config(name="t", data={"root": str(tmp_path / "no-such-data")})
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="splitcem.study.trials"):
            status = run_trial(cfg.to_dict(), str(run), threads=1)
        waited = time.monotonic() - t0
    finally:
        holder.kill()
        holder.wait(timeout=30)
    assert waited > 1.0, waited  # it did not start until the holder let go (2 s)
    assert any("still being run" in r.message for r in caplog.records)
    assert status["status"] == "failed" and status["attempts"] == 2


def test_committed_runs_adopt_into_reproduce(tmp_path):
    """The committed CPU-protocol runs (``amp: true`` or ``auto``) adopt into the bundled
    sweep's ``amp: auto`` trials where auto means the same path (a CPU with native bf16)
    and their attacks are the protocol's; the others run again."""
    from splitcem.runtime import native_bf16
    from splitcem.study.grid import expand, load_sweep
    from splitcem.study.reproduce import sweep_file
    from splitcem.study.trials import plan_trials

    if not native_bf16("cpu"):
        pytest.skip("this CPU has no native bf16: amp: auto resolves to float32 here, so the "
                    "committed bf16 runs are rightly not the bundled sweep's runs")
    if not COMMITTED.is_dir():
        pytest.skip(f"{COMMITTED} is not in this checkout")
    trials = expand(load_sweep(sweep_file("cifar10", "cpu")))
    protocol = trials[0].cfg.attack.attacks
    res, jobs = plan_trials(trials, tmp_path / "out", adopt=[COMMITTED], device="cpu")
    # the sweep's first-round trials (runs of later seeds-until-decided rounds are adopted
    # when a round asks for them)
    names = {t.name for t in trials}
    committed = sorted(p.name for p in COMMITTED.iterdir() if p.is_dir() and p.name in names)
    # attacked on the fixed split (125) by the protocol's attacks (as the sweep file sets
    # them now): seed 125's legacy runs once, the sweep's own runs since
    s125 = [n for n in committed if (RunRecord.load(COMMITTED / n).split or {}).get("seed")
            == 125 and RunRecord.load(COMMITTED / n).config.attack.attacks == protocol]
    assert sorted(res.adopted) == s125
    # the others were attacked on their own seed's partition or by the protocol's earlier
    # attacks (decoder_adaptive from random weights, 25 epochs) and have no checkpoint:
    # neither adopted as attacked nor as trained, so they run
    others = set(committed) - set(s125)
    assert others <= {t.name for t, _, _ in jobs}
    for name in s125:
        rec = RunRecord.load(tmp_path / "out" / name)
        trial = next(t for t in trials if t.name == name)
        assert rec.finished(trial.cfg, device="cpu") and rec.split["seed"] == 125
        assert rec.metrics["adopted_from"] == str(COMMITTED / name)


@pytest.mark.slow
def test_a_run_attacked_on_another_split_is_adopted_as_trained_and_reattacked(tiny_config,
                                                                              tmp_path):
    """With its checkpoint, a run attacked on another partition (here: its own seed's, as
    before split_seed existed, with amp: true) stands in for a fixed-split ``amp: auto``
    trial as *trained*: not retrained, only attacked again on the fixed split."""
    from splitcem.experiment import run_experiment
    from splitcem.runtime import native_bf16
    from splitcem.study.grid import Trial
    from splitcem.study.trials import run_trials

    if not native_bf16("cpu"):
        pytest.skip("this CPU has no native bf16: amp: true and amp: auto are different runs")
    small = {"model": {"client_width": 0.125, "server_width": 0.125},
             "attack": {"attacks": [{"name": "decoder", "epochs": 1, "width": 8, "depth": 1}]}}
    old = tiny_config(name="old", data={"split_seed": None},
                      train={"epochs": 1, "warmup_epochs": 0, "amp": True,
                             "channels_last": True}, **small)
    run_experiment(old, tmp_path / "src" / "old", progress=False)
    src_ckpt = tmp_path / "src" / "old" / "checkpoints" / "last.pt"
    trial = tiny_config(name="t", train={"epochs": 1, "warmup_epochs": 0, "amp": "auto",
                                         "channels_last": "auto"}, **small)
    assert trial.data.split_seed == 125 and RunRecord.load(src_ckpt.parents[1]).split[
        "seed"] == 0
    res = run_trials([Trial("t", trial, 0)], tmp_path / "out",
                     engine=LOOP.but(adopt=(tmp_path / "src",)))
    assert res.adopted == [] and res.ran == ["t"]  # not a finished result: attacked again
    st = res.statuses["t"]
    assert st["status"] == "finished" and st["resumed"] is True
    rec = RunRecord.load(tmp_path / "out" / "t")
    assert rec.finished(trial) and rec.attacks["split"]["seed"] == 125
    hist = rec.metrics["train"]["history"]
    assert len(hist) == 1 and rec.metrics["adopted_from"] == str(tmp_path / "src" / "old")
    # not retrained: the trial's checkpoint is the adopted one, byte for byte
    assert (tmp_path / "out" / "t" / "checkpoints" / "last.pt").read_bytes() == \
        src_ckpt.read_bytes()


def test_a_config_changed_after_the_results_is_stale(tmp_path):
    """Results carry the hash of what ran: a config.yaml edited (or rewritten by a re-run
    killed before it could mark itself) afterwards makes them stale, not the new config's."""
    raw = _raw("r", 125)
    cfg = load_config(raw)
    num = {"device": "cpu", "amp": False, "channels_last": False}
    done = {"status": "attacked", "config_hash": train_hash(cfg, numerics=num), "numerics": num,
            "train": {"epochs": 2}, "attacks": {"attacks": {"decoder": {"metrics": {}}}}}
    run = _legacy_run(tmp_path, raw, done)
    assert RunRecord.load(run).finished(cfg)
    changed = {**raw, "defenses": [{"name": "noise", "sigma": 0.3}]}
    (run / "config.yaml").write_text(yaml.safe_dump(changed))
    rec = RunRecord.load(run)
    assert rec.stale and rec.status == "training" and not rec.finished()
    assert not rec.finished(load_config(changed)) and not rec.finished(cfg)
    assert rec.unfinished().startswith("stale")


def test_a_run_records_the_code_and_machine_behind_each_phase(tmp_path, monkeypatch):
    """``metrics.json``'s ``made_by``: the commit (of the checkout splitcem is imported from),
    versions and CPU of each training start, resume and attack recording; a fresh start
    drops the old entries; the summary says it; provenance never changes what compares."""
    import shutil

    import torch

    import splitcem
    from splitcem import provenance
    from splitcem.report import write_summary

    cfg = load_config(_raw("p", 125))
    rec = RunRecord.begin_training(tmp_path / "p", cfg, resume=False, device="cpu")
    rec = rec.finish_training({**rec.metrics, "train": {"epochs": 2, "test_accuracy": 0.5}})
    rec = rec.record_attacks({"attacks": {"decoder": {"metrics": {"mse": 0.01}}}}, cfg,
                             device="cpu")
    train, attacks = RunRecord.load(tmp_path / "p").metrics["made_by"]
    assert (train["phase"], attacks["phase"]) == ("train", "attacks")
    assert train["splitcem"] == splitcem.__version__ and train["torch"] == torch.__version__
    assert train["cpu"] and train["gpu"] is None
    if (REPO / ".git").exists() and shutil.which("git"):  # a checkout (CI's clone is one)
        head = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], text=True,
                              capture_output=True, check=True).stdout.strip()
        assert train["commit"].split("+")[0] == head
    assert rec.finished(cfg)  # provenance is not part of any hash
    write_summary(tmp_path / "p", rec.metrics, cfg)
    assert f"- made by: train {str(train['commit'])[:12]}" in \
        (tmp_path / "p" / "summary.md").read_text()
    from splitcem.runtime import bf16_kernels

    assert train["bf16"] == attacks["bf16"] == bf16_kernels("cpu")
    # the kernels bf16 ran on show in the summary for a bf16 run, not for a float32 one
    assert f"bf16 {train['bf16']}" not in (tmp_path / "p" / "summary.md").read_text()
    write_summary(tmp_path / "p", {**rec.metrics, "numerics": {"amp": True}}, cfg)
    assert f"bf16 {train['bf16']}, " in (tmp_path / "p" / "summary.md").read_text()

    again = RunRecord.begin_training(tmp_path / "p", cfg, resume=True, device="cpu")
    assert [e["phase"] for e in again.metrics["made_by"]] == ["train", "attacks", "resume"]
    fresh = RunRecord.begin_training(tmp_path / "p", cfg, resume=False, device="cpu")
    assert [e["phase"] for e in fresh.metrics["made_by"]] == ["train"]

    # an installed copy (no checkout above the package): no commit, still the rest
    monkeypatch.setattr(provenance, "_ROOT", tmp_path)
    provenance._commit.cache_clear()
    try:
        entry = provenance.made_by("train", "cpu")
    finally:
        provenance._commit.cache_clear()
    assert entry["commit"] is None and entry["torch"] == torch.__version__
