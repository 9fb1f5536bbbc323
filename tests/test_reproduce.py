"""``splitcem reproduce``: ``--list`` (trial states, core-hours left) and the per-defense paper
table, on synthetic finished runs written through the run record (no data, no training)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from splitcem.config import RunConfig, load_config
from splitcem.errors import ConfigError
from splitcem.record import RunRecord
from splitcem.runid import resolved_amp
from splitcem.study.frontier import compare
from splitcem.study.grid import Trial, expand, load_sweep
from splitcem.study.groups import find_runs
from splitcem.study.listing import (
    Machine,
    Pace,
    TrialState,
    core_hours_left,
    format_listing,
    list_trials,
    pace,
    run_cost,
)
from splitcem.study.paper import (
    PAPER_GAINS,
    cem_lambda,
    curve_table,
    defense_of,
    paper_table,
    write_paper,
)
from splitcem.study.reproduce import sweep_file

ZOO = ("topk", "dropout", "nopeek", "adversarial", "patrol", "ldp", "bottleneck")


def _cfg(name: str, seed: int, defenses: list[dict], lam: float = 0.0) -> RunConfig:
    return load_config({"name": name, "seed": seed, "defenses": defenses,
                        "train": {"epochs": 2, "warmup_epochs": 0},
                        "cem": {"lambda": lam, "clusters": 5, "form": "paper"}})


def write_run(path: Path, cfg: RunConfig, acc: float, mse: float, *, train_s: float = 60.0,
              attack_s: float = 30.0, threads: int = 1, attacked: bool = True,
              machine: Machine | None = None, cpu: tuple[float, float] | None = None
              ) -> RunRecord:
    """A finished (trained + attacked) run directory, written by the record's own writers
    (``attacked=False``: trained only; ``machine``: the one it records it trained on;
    ``cpu``: the (train, attack) CPU seconds it records, else none, as before splitcem
    recorded them)."""
    rec = RunRecord.begin_training(path, cfg, resume=False, device="cpu")
    amp, cl = resolved_amp(cfg.train.amp, "cpu", cfg.train.channels_last)
    where = {} if machine is None else {"device": machine.device, "native_bf16":
                                        machine.native_bf16,
                                        "cpu_capability": machine.cpu_capability,
                                        "bf16_via_float32": machine.bf16_via_float32}
    rec = rec.finish_training({**rec.metrics, "numerics": {"amp": amp, "channels_last": cl,
                                                           "threads": threads, **where},
                               "train": {"test_accuracy": acc, "seconds": train_s,
                                         "epochs": cfg.train.epochs,
                                         **({} if cpu is None else {"cpu_seconds": cpu[0]})}})
    if not attacked:
        return rec
    figures = {"mse": mse, "ssim": 1.0 - 20 * mse, "psnr": -10 * math.log10(mse)}
    worst = {m: {"attack": "decoder", "value": v} for m, v in figures.items()}
    return rec.record_attacks({"attacks": {"decoder": {"name": "decoder", "metrics": figures}},
                               "worst": worst, "seconds": attack_s,
                               **({} if cpu is None else {"cpu_seconds": cpu[1]})},
                              cfg, device="cpu")


@pytest.fixture(scope="module")
def bundled() -> list[Trial]:
    return expand(load_sweep(sweep_file("cifar10", "cpu")))


# ------------------------------------------------------------------------------ --list
def test_list_of_the_bundled_sweep_shows_every_zoo_defense_with_and_without_cem(tmp_path,
                                                                                bundled):
    trials = bundled
    by_defense: dict[str, dict[bool, list[Trial]]] = {d: {False: [], True: []} for d in ZOO}
    for t in trials:
        name, _, _ = defense_of(t.cfg)
        if name in by_defense:
            by_defense[name][t.cfg.cem is not None and t.cfg.cem.lam > 0].append(t)
    for name, split in by_defense.items():
        strengths = sorted({defense_of(t.cfg)[2] for t in split[False]})
        # its own curve: three strengths (adversarial four: CEM landed below the first three)
        assert len(strengths) == (4 if name == "adversarial" else 3), (name, strengths)
        cem_at = {defense_of(t.cfg)[2] for t in split[True]}
        lambdas = {t.cfg.cem.lam for t in split[True]}  # type: ignore[union-attr]
        assert cem_at == {strengths[1]} and len(lambdas) == 2, (name, cem_at, lambdas)
    assert any(defense_of(t.cfg)[0] == "cut" for t in trials)  # the cut baseline stays

    from splitcem.cli import app

    out = CliRunner().invoke(app, ["reproduce", "cifar10", "--list", "--out",
                                   str(tmp_path / "none"), "--set", "train.epochs=3"])
    assert out.exit_code == 0, out.output
    lines = out.output.splitlines()
    assert [ln.split()[0] for ln in lines[:len(trials)]] == [t.name for t in trials]
    assert all(ln.split()[1] == "pending" for ln in lines[:len(trials)])
    assert "core-hours left: unknown" in out.output
    assert not (tmp_path / "none").exists()  # --list writes nothing


def test_list_says_finished_adopted_failed_pending_and_the_core_hours_left(tmp_path):
    out, adopt = tmp_path / "sweep", tmp_path / "old"
    noise = [{"name": "noise", "sigma": 0.1}]
    topk = [{"name": "topk", "ratio": 0.3}, {"name": "noise", "sigma": 0.1}]
    trials = [Trial(n, _cfg(n, s, d, lam), s) for n, s, d, lam in (
        ("done", 125, noise, 0.0), ("adopt", 126, noise, 0.0), ("broke", 127, noise, 0.0),
        ("todo", 128, noise, 0.0), ("todo_topk", 125, topk, 0.0), ("topk_done", 126, topk, 0.0),
        ("todo_topk_cem", 125, topk, 1.0))]
    # train s, attack s, threads
    costs = {"done": (100.0, 40.0, 2), "adopt": (300.0, 20.0, 1), "topk_done": (900.0, 50.0, 1)}
    for name in costs:
        t = next(t for t in trials if t.name == name)
        train_s, attack_s, threads = costs[name]
        where = adopt / "an_old_name" if name == "adopt" else out / name
        cfg = t.cfg.model_copy(update={"name": "an_old_name"}) if name == "adopt" else t.cfg
        write_run(where, cfg, 0.8, 0.01, train_s=train_s, attack_s=attack_s, threads=threads)
    broke = next(t for t in trials if t.name == "broke")
    RunRecord.begin_training(out / "broke", broke.cfg, resume=False,
                             device="cpu").mark_failed("RuntimeError: boom")
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))

    states = {s.name: s for s in list_trials(trials, out, adopt=[adopt], device="cpu")}
    assert {n: s.state for n, s in states.items()} == {
        "done": "finished", "adopt": "adopted", "broke": "failed", "todo": "pending",
        "todo_topk": "pending", "topk_done": "finished", "todo_topk_cem": "pending"}
    assert "boom" in states["broke"].note
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # read only

    # the recorded cost: (train, attack) seconds x threads
    recorded = {n: (c[0] * c[2], c[1] * c[2]) for n, c in costs.items()}
    assert run_cost(RunRecord.load(out / "done")) == recorded["done"]
    # a run that recorded its CPU seconds costs those (another job's load on a busy machine
    # slows its wall clock, not its CPU time), whatever its threads
    timed = _cfg("timed", 125, noise)
    write_run(tmp_path / "timed", timed, 0.8, 0.01, train_s=100.0, attack_s=40.0, threads=2,
              cpu=(150.0, 70.0))
    assert run_cost(RunRecord.load(tmp_path / "timed")) == (150.0, 70.0)
    # per epoch (pace() compares runs by it): the trials' configs train 2 epochs
    assert states["done"].epoch_cost == recorded["done"][0] / 2
    assert states["adopt"].epoch_cost == recorded["adopt"][0] / 2

    from splitcem.study.listing import core_hours_left

    listed = list(states.values())
    hours, n = core_hours_left(listed)
    noise_mean = sum(sum(recorded[k]) for k in ("done", "adopt")) / 2
    topk = sum(recorded["topk_done"])
    # noise trials: the mean of the noise runs; top-k without CEM: its run; top-k with CEM
    # has no finished run of its own kind: top-k's (the mean of all runs is lower here)
    assert n == len(recorded)
    assert states["todo"].estimate == pytest.approx(noise_mean)
    assert states["broke"].estimate == pytest.approx(noise_mean)
    assert states["todo_topk"].estimate == pytest.approx(topk)
    assert states["todo_topk_cem"].estimate == pytest.approx(topk)
    assert hours == pytest.approx((2 * noise_mean + 2 * topk) / 3600)


def test_runs_made_elsewhere_are_put_on_this_machines_pace(tmp_path):
    """Finished runs from a machine with native bf16 are scaled to the pace of one that
    emulates it, by the ratio on the settings finished on both; without such a setting
    they count as they are, and the listing says which."""
    fast, slow = Machine("cpu", True, True, "AVX512"), Machine("cpu", True, False, "AVX512")
    noise, topk = ("noise", False), ("topk", False)

    def done(name: str, kind: tuple[str, bool], machine: Machine,
             cost: tuple[float, float]) -> TrialState:
        return TrialState(name, "finished", kind, cost=cost, setting=name.split("_")[0],
                          machine=machine)

    finished = [done("a_s1", noise, fast, (100.0, 50.0)), done("a_s2", noise, slow, (400.0, 150.0)),
                done("b_s1", topk, fast, (200.0, 60.0))]
    left = [TrialState("b_s2", "pending", topk, setting="b", machine=slow),
            TrialState("c_s1", "pending", ("topk", True), setting="c", machine=slow)]
    states = finished + left
    assert pace(states, slow) == pytest.approx(Pace(4.0, 3.0, 1, 2, 0, 1))
    hours, n = core_hours_left(states)
    assert n == 3
    # b's one run (made on the fast machine) at the slow one's pace; c has no run of its
    # kind: top-k's
    assert left[0].estimate == pytest.approx(200 * 4 + 60 * 3)
    assert left[1].estimate == pytest.approx(200 * 4 + 60 * 3)
    assert hours == pytest.approx(2 * 980 / 3600)
    text = format_listing(states)
    assert "2 run(s) made elsewhere put on the pace of cpu (AVX512), bf16 autocast emulated: " \
        "train x4.00, attacks x3.00 (the ratio on 1 setting(s) run both ways)" in text

    # no setting finished on the slow machine: the others count at their own pace, said
    alone = [finished[0], finished[2], *left]
    assert pace(alone, slow) == Pace(1.0, 1.0, 0, 2)
    core_hours_left(alone)
    assert left[0].estimate == pytest.approx(260.0)
    assert "2 run(s) made elsewhere (or not saying where) count at their own pace: no " \
        "setting has finished on cpu (AVX512), bf16 autocast emulated yet" in format_listing(alone)

    # a trial training on the slow machine now: its last epoch against its setting's runs
    # elsewhere per epoch (b: 200 s per epoch there, 1000 here) sets training's pace before
    # any run has finished here; the attacks, unmeasured here, stay at their own pace
    flying = TrialState("b_s3", "running", topk, setting="b", machine=slow, epoch_cost=1000.0,
                        train_left=3000.0)
    assert pace([*alone, flying], slow) == pytest.approx(Pace(5.0, 1.0, 0, 2, 1, 1))
    core_hours_left([*alone, flying])
    assert left[0].estimate == pytest.approx(200 * 5 + 60)
    assert flying.estimate == pytest.approx(3000 + 60)  # its own epochs left, then attacks
    assert "train x5.00 (per epoch, from 1 trial(s) training here on 1 setting(s)); attacks " \
        "at their own pace" in format_listing([*alone, flying])
    # beside a setting finished both ways: training's factor over both settings
    assert pace([*states, flying], slow) == pytest.approx(Pace(math.sqrt(4 * 5), 3.0, 1, 2, 1, 2))
    assert "(the ratio on 1 setting(s) run both ways; training per epoch also from 1 trial(s) " \
        "training here)" in format_listing([*states, flying])
    # a killed trial's epoch (maybe another machine's) and one on another machine count not
    assert pace([*alone, TrialState("b_s3", "pending", topk, setting="b", machine=slow,
                                    epoch_cost=1000.0)], slow) == Pace(1.0, 1.0, 0, 2)
    assert pace([*alone, TrialState("b_s3", "running", topk, setting="b", machine=fast,
                                    epoch_cost=1000.0)], slow) == Pace(1.0, 1.0, 0, 2)

    # list_trials reads where a finished run trained from its record, and places a trial
    # left to do on this machine
    cfg = _cfg("r", 125, [{"name": "noise", "sigma": 0.1}])
    write_run(tmp_path / "r", cfg, 0.8, 0.01, machine=fast)
    write_run(tmp_path / "old", _cfg("old", 125, [{"name": "noise", "sigma": 0.1}]), 0.8, 0.01)
    got = list_trials([Trial("r", cfg, 125), Trial("old", _cfg("old", 125, [
        {"name": "noise", "sigma": 0.1}]), 125), Trial("new", _cfg("new", 126, [
            {"name": "noise", "sigma": 0.1}]), 126)], tmp_path, device="cpu")
    ran_amp = resolved_amp(cfg.train.amp, "cpu", cfg.train.channels_last)[0]  # as write_run
    # a run from before where it trained was recorded: None
    assert [s.machine for s in got[:2]] == [Machine("cpu", ran_amp, True, "AVX512"), None]
    assert got[2].machine == Machine.here(Trial("new", cfg, 126), "cpu")
    assert [s.setting for s in got] == ["r", "old", "new"]


def test_bf16_via_float32_kernels_is_a_machine_of_its_own(tmp_path):
    """Runs whose bf16 ran through float32 kernels (about float32's pace) are not paced with
    those that ran PyTorch's emulation (about 10x slower); a run whose phases ran on both
    (resumed by a newer splitcem) sets no pace: it says nothing where it trained."""
    old = Machine("cpu", True, False, "AVX2")
    via = Machine("cpu", True, False, "AVX2", bf16_via_float32=True)
    assert via != old and via.describe() == "cpu (AVX2), bf16 autocast via float32 kernels"
    cfg = _cfg("n", 125, [{"name": "noise", "sigma": 0.1}])
    cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update={"amp": True})})

    def run(name: str, machine: Machine, kernels: list[str | None]) -> Machine | None:
        rec = write_run(tmp_path / name, cfg, 0.8, 0.01, machine=machine)
        # made_by as the phases recorded it (None: before splitcem recorded the kernels)
        rec.metrics["made_by"] = [{"phase": ph, **({"bf16": k} if k else {})}
                                  for ph, k in zip(("train", "resume", "attacks"), kernels,
                                                   strict=False)]
        return Machine.of_run(rec)

    assert run("old", old, [None, None]) == old
    assert run("new", via, ["float32 kernels", "float32 kernels", "float32 kernels"]) == via
    assert run("mixed", via, [None, "float32 kernels", "float32 kernels"]) is None
    flag = run("native", Machine("cpu", True, True, "AVX512", bf16_via_float32=True), ["native"])
    assert flag == Machine("cpu", True, True, "AVX512")  # native: the flag says nothing


def test_runs_from_two_other_machines_are_paced_each_by_its_own_ratio():
    """Runs made on a fast and on a middling machine, both paced to a slow one: each by the
    ratio on the settings it shares with the slow one (8x and 2x), not by one pooled factor
    between the two (4x, which would halve the fast runs' estimate and double the others');
    a machine sharing no setting takes the pooled factor, and the listing says which."""
    fast, mid = Machine("cpu", True, True, "AVX512"), Machine("cpu", True, False, "AVX512")
    slow, odd = Machine("cpu", True, False, "AVX2"), Machine("cuda", True, True, None)
    kinds = {"a": ("noise", False), "b": ("noise", False), "c": ("topk", False),
             "d": ("dropout", False), "e": ("ldp", False)}  # c, d, e: one run of their kind

    def st(name: str, machine: Machine, cost: tuple[float, float] | None = None,
           state: str = "finished") -> TrialState:
        return TrialState(name, state, kinds[name[0]], cost=cost, setting=name.split("_")[0],
                          machine=machine)

    states = [st("a_s1", fast, (100.0, 10.0)), st("a_s2", slow, (800.0, 80.0)),
              st("b_s1", mid, (400.0, 40.0)), st("b_s2", slow, (800.0, 80.0)),
              st("c_s1", fast, (100.0, 10.0)), st("d_s1", mid, (400.0, 40.0)),
              st("e_s1", odd, (50.0, 5.0))]
    left = [st(f"{k}_s9", slow, state="pending") for k in "cde"]
    assert pace([*states, *left], slow) == pytest.approx(Pace(4.0, 4.0, 2, 5, 0, 2))
    core_hours_left([*states, *left])
    # each from the one run of its kind: c's (fast) x8, d's (middling) x2, e's (on a machine
    # sharing no setting) at the pooled x4
    assert [s.estimate for s in left] == pytest.approx([880.0, 880.0, 55 * 4.0])
    text = format_listing([*states, *left])
    assert "5 run(s) made elsewhere put on the pace of cpu (AVX2), bf16 autocast emulated: " \
        "train x4.00, attacks x4.00 (the ratio on 2 setting(s) run both ways)" in text
    assert "    of them 2 made on cpu (AVX512), bf16 autocast native: train x8.00, attacks " \
        "x8.00 (on 1 setting(s) shared with it)" in text
    assert "    of them 2 made on cpu (AVX512), bf16 autocast emulated: train x2.00, attacks " \
        "x2.00 (on 1 setting(s) shared with it)" in text
    assert "    of them 1 made on cuda, bf16 autocast native: as above (no setting shared " \
        "with it)" in text


def test_list_shows_a_trial_a_live_process_runs_as_running(tmp_path):
    """A trial whose trial.json names a live process on this host is ``running``; one whose
    process is gone (a killed sweep) is ``pending``; another host's claim is only reported."""
    import os
    import socket
    import subprocess
    import sys

    from splitcem.study.listing import format_listing

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    noise = [{"name": "noise", "sigma": 0.1}]
    here = socket.gethostname()
    claims = {"live": (os.getpid(), here), "killed": (gone.pid, here),
              "elsewhere": (os.getpid(), here + "-other"), "attacking": (os.getpid(), here),
              "trained": (gone.pid, here), "midway": (os.getpid(), here),
              "first": (os.getpid(), here)}
    trials = []
    for name, (pid, host) in claims.items():
        t = Trial(name, _cfg(name, 125, noise), 125)
        if name in ("attacking", "trained"):  # trained, its attacks not recorded yet
            rec = write_run(tmp_path / name, t.cfg, 0.8, 0.01, attacked=False)
        else:
            rec = RunRecord.begin_training(tmp_path / name, t.cfg, resume=False, device="cpu")
        if name in ("live", "midway"):  # its first epoch checkpointed, in two minutes
            rec = rec.record_epoch(1, 120.0)
        if name == "midway":  # and a quarter of its second, in a checkpoint within it
            rec = rec.record_within_epoch(25, 100, 31.0)
        if name == "first":  # half its first epoch, in one minute
            rec = rec.record_within_epoch(50, 100, 60.0)
        rec.write_trial({"name": name, "status": "running", "pid": pid, "host": host,
                         "started": "2026-12-06T00:33:20"})
        trials.append(t)
    states = {s.name: s for s in list_trials(trials, tmp_path, device="cpu")}
    assert {n: s.state for n, s in states.items()} == {
        "live": "running", "killed": "pending", "elsewhere": "pending", "attacking": "running",
        "trained": "pending", "midway": "running", "first": "running"}
    # only the attacks are left of a trained run: its estimate is the attacks' cost
    assert [n for n, s in states.items() if s.attacks_only] == ["attacking", "trained"]
    assert states["attacking"].note.startswith("attacking: pid")
    assert states["trained"].note.startswith("trained here, attacks left")
    assert states["live"].note == \
        f"training, epoch 1/2 done (2.0 min): pid {os.getpid()} since 2026-12-06T00:33:20"
    assert states["live"].train_left == 120.0  # one epoch left at its last epoch's pace
    assert states["live"].epoch_cost == 120.0  # this machine's pace (pace() compares it)
    assert states["killed"].train_left is None  # no epoch recorded
    assert "training" in states["killed"].note and "pid" not in states["killed"].note
    assert "-other" in states["elsewhere"].note and "not checked" in states["elsewhere"].note
    # a checkpoint within an epoch: the share done is not left; the last epoch sets the pace
    assert states["midway"].note.startswith("training, epoch 1/2 done (2.0 min), 25% of epoch 2")
    assert states["midway"].train_left == pytest.approx(90.0)
    assert states["midway"].epoch_cost == 120.0
    # before a first epoch ends, the share done sets the pace
    assert states["first"].note.startswith("training, 50% of epoch 1: pid")
    assert states["first"].train_left == pytest.approx(180.0)
    assert states["first"].epoch_cost == pytest.approx(120.0)
    assert "4 running, 3 pending" in format_listing(list(states.values()))

def test_list_says_why_a_trained_run_under_adopt_is_not_the_trials_result(tmp_path):
    """A run trained for the trial but attacked otherwise (other attacks, or another aux /
    eval partition) with no checkpoint runs again, and --list says which it was."""
    noise = [{"name": "noise", "sigma": 0.1}]
    trial = Trial("t", _cfg("t", 125, noise), 125)
    adopt = tmp_path / "old"
    other_attacks = trial.cfg.model_copy(update={"name": "a", "attack": trial.cfg.attack.model_copy(
        update={"attacks": [{"name": "decoder", "epochs": 3}]})})
    other_split = trial.cfg.model_copy(update={"name": "b", "data": trial.cfg.data.model_copy(
        update={"split_seed": 7})})
    for cfg in (other_attacks, other_split):
        write_run(adopt / cfg.name, cfg, 0.8, 0.01)
    for only, why in (("a", "attacked with other attacks"),
                      ("b", "attacked on another partition")):
        state, = list_trials([trial], tmp_path / "out", adopt=[adopt / only], device="cpu")
        assert state.state == "pending" and why in state.note and "runs again" in state.note


# ------------------------------------------------------- runs made on another numeric path
def _machine(monkeypatch, *, bf16: bool) -> None:
    """Pretend to be an AVX512 CPU with or without native bf16 (AVX512-BF16)."""
    import torch

    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: bf16, raising=False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)


def test_amp_pins_every_trials_training_and_attacks(bundled):
    """--amp sets train.amp and the amp of every attack that has one (the same configs as
    the --set lines it replaces), and leaves an attack without the setting alone."""
    from splitcem.study.grid import add_overrides, pin_amp

    pinned = expand(add_overrides(load_sweep(sweep_file("cifar10", "cpu")), [], amp=True))
    by_hand = expand(add_overrides(load_sweep(sweep_file("cifar10", "cpu")), [
        "train.amp=true", "attack.attacks.0.amp=true", "attack.attacks.1.amp=true"]))
    assert [t.cfg.to_dict() for t in pinned] == [t.cfg.to_dict() for t in by_hand]
    assert [t.name for t in pinned] == [t.name for t in bundled]
    assert all(t.cfg.train.amp == "auto" for t in bundled)
    raw = pin_amp({"attack": {"attacks": [{"name": "mean_image"}, {"name": "decoder"}]}}, False)
    assert raw == {"train": {"amp": False}, "attack": {"attacks": [
        {"name": "mean_image"}, {"name": "decoder", "amp": False}]}}
    with pytest.raises(ConfigError, match="--amp must be true, false or auto"):
        add_overrides(load_sweep(sweep_file("cifar10", "cpu")), [], amp="fast")  # type: ignore

    from splitcem.cli import app

    res = CliRunner().invoke(app, ["reproduce", "cifar10", "--list", "--amp", "fast"])
    assert res.exit_code == 2 and "--amp must be true, false or auto" in res.output
    res = CliRunner().invoke(app, ["sweep", "a.yaml", "b.yaml", "--amp", "true"])
    assert res.exit_code == 2 and "--amp pins a sweep file's trials" in res.output


def test_runs_made_where_bf16_is_native_are_named_and_kept_on_a_machine_without(
        tmp_path, monkeypatch):
    """Runs trained and attacked with amp: auto on a bf16 machine are another numeric path
    on a machine without native bf16: --list names them and the --amp that keeps their path,
    re-running the sweep into their folder refuses (it would replace them) instead of
    retraining, and with --amp true they count as finished there and adopt from --adopt."""
    from splitcem.study.grid import SweepSpec
    from splitcem.study.listing import list_sweep
    from splitcem.study.trials import plan_trials

    spec = SweepSpec(name="s", root=tmp_path, base=None, seeds=[125, 126], grid={},
                     set={"train.epochs": 2, "train.warmup_epochs": 0,
                          "defenses": [{"name": "noise", "sigma": 0.1}]},
                     variants=[{"name": "noise0.1"}])
    trials = expand(spec)
    _machine(monkeypatch, bf16=True)  # where the runs were made
    for t in trials:
        for where in (tmp_path / "old" / t.name, tmp_path / "sweep" / t.name):
            write_run(where, t.cfg, 0.8, 0.01)
    assert RunRecord.load(tmp_path / "old" / trials[0].name).numerics["amp"] is True
    assert [s.state for s in list_sweep(spec, tmp_path / "sweep")[0]] == ["finished"] * 2

    _machine(monkeypatch, bf16=False)  # this machine: amp: auto resolves to float32
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    states, text = list_sweep(spec, tmp_path / "fresh", adopt=[tmp_path / "old"], device="cpu")
    assert [s.state for s in states] == ["pending", "pending"]
    assert all("ran bf16 autocast + channels-last: another numeric path" in s.note
               for s in states)
    assert "2 trial(s) match runs made on another numeric path (bf16 autocast" in text
    assert "here they would train float32 + channels-last" in text and "--amp true" in text
    with pytest.raises(ConfigError, match="re-running would replace them: pass that --amp"):
        plan_trials(trials, tmp_path / "sweep", device="cpu")
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before  # untouched

    from splitcem.study.grid import add_overrides

    pinned_spec = add_overrides(spec, [], amp=True)
    pinned = expand(pinned_spec)
    res, jobs = plan_trials(pinned, tmp_path / "sweep", device="cpu")
    assert sorted(res.skipped) == sorted(t.name for t in trials) and not jobs
    states, text = list_sweep(pinned_spec, tmp_path / "fresh", adopt=[tmp_path / "old"],
                              device="cpu")
    assert [s.state for s in states] == ["adopted", "adopted"]
    assert "numeric path" not in text


def test_a_rerun_continues_the_trials_it_started_before_new_ones(tmp_path):
    """plan_trials puts the trials with work on disk (a killed run's epoch checkpoint, or
    trained and not attacked) first, each part in the sweep's order, so a re-run (e.g. with
    trials added to the file) finishes what it started before starting anything new."""
    from splitcem.record import CHECKPOINT, PARTIAL_CHECKPOINT
    from splitcem.study.grid import SweepSpec
    from splitcem.study.trials import plan_trials

    spec = SweepSpec(name="s", root=tmp_path, base=None, seeds=[125], grid={},
                     set={"train.epochs": 2, "train.warmup_epochs": 0,
                          "defenses": [{"name": "noise", "sigma": 0.1}]},
                     variants=[{"name": "noise{sigma}",
                                "grid": {"defenses.0.sigma": [0.1, 0.2, 0.3, 0.4, 0.5]}}])
    trials = expand(spec)
    out = tmp_path / "sweep"
    write_run(out / trials[0].name, trials[0].cfg, 0.8, 0.01)  # finished: skipped
    killed = RunRecord.begin_training(out / trials[2].name, trials[2].cfg, resume=False,
                                      device="cpu").record_epoch(1, 60.0)
    (killed.path / CHECKPOINT).parent.mkdir(parents=True, exist_ok=True)
    (killed.path / CHECKPOINT).write_bytes(b"epoch 1")
    write_run(out / trials[4].name, trials[4].cfg, 0.8, 0.01, attacked=False)  # attacks left
    res, jobs = plan_trials(trials, out, device="cpu")
    assert res.skipped == [trials[0].name]
    assert [t.name for t, _, _ in jobs] == [trials[i].name for i in (2, 4, 1, 3)]
    (killed.path / CHECKPOINT).unlink()  # nothing to continue from: back in its place
    res, jobs = plan_trials(trials, out, device="cpu")
    assert [t.name for t, _, _ in jobs] == [trials[i].name for i in (4, 1, 2, 3)]
    # killed within its first epoch: a checkpoint within it is work to continue too
    (killed.path / PARTIAL_CHECKPOINT).write_bytes(b"epoch 1, batch 25")
    res, jobs = plan_trials(trials, out, device="cpu")
    assert [t.name for t, _, _ in jobs] == [trials[i].name for i in (2, 4, 1, 3)]


# ------------------------------------------------------------------------- paper table
def _curve_fixture(tmp_path: Path) -> dict:
    """Runs of three curves (noise over sigma, topk over ratio, dropout over p; seeds 1, 2)
    and CEM cells at topk 0.3 (seeds 1, 2) and dropout 0.2 (seed 1: exploratory), with
    figures drawn from a seeded generator."""
    rng = np.random.default_rng(19)
    spec = {"noise": ("sigma", [0.1, 0.2, 0.3], lambda v: []),
            "topk": ("ratio", [0.5, 0.3, 0.1], lambda v: [{"name": "topk", "ratio": v}]),
            "dropout": ("p", [0.1, 0.2, 0.4], lambda v: [{"name": "dropout", "p": v}])}
    cells: dict = {}
    for name, (_param, values, zoo) in spec.items():
        for i, v in enumerate(values):
            acc0, mse0 = 0.80 - 0.02 * i, 0.010 * (1 + 0.25 * i)
            for seed in (1, 2):
                sigma = v if name == "noise" else 0.1
                cfg = _cfg(f"{name}{v}_s{seed}", seed, [*zoo(v), {"name": "noise", "sigma": sigma}])
                acc = acc0 + rng.normal(0, 0.002)
                mse = mse0 * math.exp(rng.normal(0, 0.03))
                write_run(tmp_path / cfg.name, cfg, acc, mse)
                cells.setdefault((name, 0.0), {}).setdefault(v, {})[seed] = (acc, mse)
    for name, v, lam, seeds in (("topk", 0.3, 3.0, (1, 2)), ("dropout", 0.2, 1.0, (1,))):
        _param, _, zoo = spec[name]
        for seed in seeds:
            cfg = _cfg(f"{name}{v}_cem{lam:g}_s{seed}", seed,
                       [*zoo(v), {"name": "noise", "sigma": 0.1}], lam)
            acc = 0.78 + rng.normal(0, 0.002)
            mse = 0.0125 * (1.4 if name == "topk" else 1.1) * math.exp(rng.normal(0, 0.03))
            write_run(tmp_path / cfg.name, cfg, acc, mse)
            cells.setdefault((name, lam), {}).setdefault(v, {})[seed] = (acc, mse)
    return cells


def _same(a: dict, b: dict) -> bool:
    """Two comparisons agree (up to the float rounding of a JSON round trip)."""
    keys = ("gain", "low", "high", "baseline_mse", "accuracy")
    return all(a[k] is b[k] is None or a[k] == pytest.approx(b[k], rel=1e-9)
               for k in keys) and \
        all(a[k] == b[k] for k in ("verdict", "n_seeds", "paired", "method"))


def test_paper_table_pairs_each_cem_row_with_its_own_defense_curve(tmp_path):
    cells = _curve_fixture(tmp_path)
    runs, notes = find_runs([tmp_path])
    assert not notes
    table, rows = paper_table(runs)
    by = {r["defense_name"]: r for r in rows}
    assert set(by) == {"topk", "dropout"}
    for name, lam, v in (("topk", 3.0, 0.3), ("dropout", 1.0, 0.2)):
        row, cem = by[name], cells[(name, lam)][v]
        own = compare(cells[(name, 0.0)], cem).to_dict()
        vs_noise = compare(cells[("noise", 0.0)], cem).to_dict()
        assert _same(row["vs_own"], own) and _same(row["vs_noise"], vs_noise)
        other = "dropout" if name == "topk" else "topk"
        assert row["vs_own"]["gain"] != compare(cells[(other, 0.0)], cem).gain
        base = cells[(name, 0.0)][v]
        same = np.mean([m for _, m in cem.values()]) / np.mean([m for _, m in
                                                                base.values()]) - 1
        assert row["mse_gain"] == pytest.approx(same)
        assert (row["seeds_without"], row["seeds_with"]) == (len(base), len(cem))
        assert row["strength"] == pytest.approx(v) and row["lambda"] == lam
        assert f"{100 * same:+.1f}%" in table
    assert by["topk"]["vs_own"]["interval"] is not None  # two seeds: an interval
    line = {r: next(ln for ln in table.splitlines() if ln.startswith(f"| {by[r]['defense']}"))
            for r in by}
    # a single-seed row is exploratory: no interval, marked in its row
    assert by["dropout"]["exploratory"] and by["dropout"]["vs_own"]["interval"] is None
    assert "exploratory" in line["dropout"] and "exploratory" not in line["topk"]
    avg = np.mean([by[r]["mse_gain"] for r in by])
    assert f"{100 * avg:+.1f}%" in table.splitlines()[-1]
    assert f"{100 * PAPER_GAINS[0]:+.1f}%" in table.splitlines()[-1]


def test_curve_table_places_every_defense_point_against_noise_alone(tmp_path):
    """The curves table: each zoo defense's points without CEM (never noise alone, never a
    CEM cell), each against the noise curve at its accuracy, as compare says; by accuracy."""
    cells = _curve_fixture(tmp_path)
    runs, _ = find_runs([tmp_path])
    table, rows = curve_table(runs)
    assert {(r["defense_name"], r["strength"]) for r in rows} == {
        (name, v) for (name, lam), by in cells.items() if name != "noise" and lam == 0
        for v in by}
    for r in rows:
        cell = cells[(r["defense_name"], 0.0)][r["strength"]]
        assert _same(r["vs_noise"], compare(cells[("noise", 0.0)], cell).to_dict())
        assert r["seeds"] == len(cell) and not r["exploratory"]
        assert r["accuracy"] == pytest.approx(np.mean([a for a, _ in cell.values()]))
        # two seeds: an interval wherever the point lies inside noise's accuracy range
        assert (r["vs_noise"]["interval"] is None) == (r["vs_noise"]["gain"] is None)
    assert sum(r["vs_noise"]["gain"] is not None for r in rows) >= 3
    for name in ("topk", "dropout"):
        accs = [r["accuracy"] for r in rows if r["defense_name"] == name]
        assert accs == sorted(accs, reverse=True)
    assert len(table.splitlines()) == len(rows) + 2
    body = (write_paper([tmp_path], tmp_path / "report")["curves"],
            (tmp_path / "report" / "paper_table.md").read_text())
    assert body[0] == table and table in body[1]
    written = json.loads((tmp_path / "report" / "defense_curves.json").read_text())
    assert [w["defense"] for w in written] == [r["defense"] for r in rows]

def test_write_paper_draws_each_defense_against_noise_alone_and_its_own_curve(
        tmp_path, monkeypatch):
    """defenses.png: one panel per defense (noise first), each with the noise-only curve, the
    defense without CEM and its CEM settings, every point the seed mean of its cell; a CEM
    setting at one strength labelled with the table's matched gain against its own curve;
    the picture shown in paper_table.md. The drawn panels are checked, not the pixels."""
    from splitcem.study import paper

    cells = _curve_fixture(tmp_path)
    drawn: dict = {}
    real = paper.plot_panels

    def spy(panels, path, **kw):
        drawn.update(panels=panels, path=path, **kw)
        return real(panels, path, **kw)

    monkeypatch.setattr(paper, "plot_panels", spy)
    res = write_paper([tmp_path], tmp_path / "report")
    panels = drawn["panels"]
    assert list(panels) == ["noise (over sigma)", "dropout (over p)", "topk (over ratio)"]
    assert drawn["baseline"] == paper.NOISE_SERIES and drawn["path"].is_file()
    assert list(panels["noise (over sigma)"]) == [paper.NOISE_SERIES]  # no noise CEM here

    def means(cell: dict) -> tuple[float, float]:
        return (np.mean([a for a, _ in cell.values()]), np.mean([m for _, m in cell.values()]))

    by_row = {r["defense_name"]: r for r in res["rows"]}
    for name, lam in (("topk", 3.0), ("dropout", 1.0)):
        series = panels[f"{name} (over {'ratio' if name == 'topk' else 'p'})"]
        noise_pts, own_pts, cem_pts = series.values()
        for pts, cell in ((noise_pts, cells[("noise", 0.0)]), (own_pts, cells[(name, 0.0)]),
                          (cem_pts, cells[(name, lam)])):
            assert [p.label for p in pts] == [f"{v:g}" for v in sorted(cell)]
            for p, v in zip(pts, sorted(cell), strict=True):
                assert (p.accuracy, p.mse) == pytest.approx(means(cell[v]))
        label = list(series)[2]
        row = by_row[name]
        assert label.startswith(f"CEM lambda={lam:g}: {100 * row['vs_own']['gain']:+.1f}%")
        assert row["vs_own"]["verdict"] in label and f"(n={row['vs_own']['n_seeds']})" in label
    md = (tmp_path / "report" / "paper_table.md").read_text()
    assert f"]({paper.PANELS_FILE})" in md
    # no finished run of any defense: no picture, and no stale one left behind
    empty = tmp_path / "none"
    empty.mkdir()
    write_paper([empty], tmp_path / "report")
    assert not (tmp_path / "report" / paper.PANELS_FILE).exists()
    assert paper.PANELS_FILE not in (tmp_path / "report" / "paper_table.md").read_text()


def test_the_bottleneck_is_a_defense_over_its_channels(bundled):
    trials = [t for t in bundled if t.name.startswith("bottleneck")]
    assert trials and all(defense_of(t.cfg)[:2] == ("bottleneck", "model.bottleneck_channels")
                          for t in trials)
    assert {defense_of(t.cfg)[2] for t in trials} == {t.cfg.model.bottleneck_channels
                                                      for t in trials}


def test_reproduce_on_finished_runs_of_the_bundled_sweep_tables_every_zoo_defense(
        tmp_path, bundled, monkeypatch):
    """The one command on a sweep folder whose every trial finished (synthetic runs): it
    trains nothing of the first round, only the seeds that the seeds-until-decided rounds
    add (here a fake trial function writes their records): the frontier's against noise
    alone, each zoo CEM setting's against its own defense's curve (never the cut baseline);
    and the table has each zoo defense's CEM rows against its own curve."""
    from splitcem.study import trials as engine
    from splitcem.study.reproduce import reproduce

    rng = np.random.default_rng(7)

    def figures() -> tuple[float, float]:
        return 0.75 + 0.05 * rng.random(), 0.01 * math.exp(rng.normal(0, 0.2))

    for t in bundled:
        write_run(tmp_path / t.name, t.cfg, *figures())
    added: list[str] = []

    def fake(cfg_dict, run_dir, *, threads=1, meta=None, device=None, progress=False,
             ship=False):  # an added seed: a finished record, no training
        cfg = load_config(cfg_dict)
        added.append(cfg.name)
        rec = write_run(Path(run_dir), cfg, *figures())
        status = {**(meta or {}), "status": "finished", "accuracy": rec.accuracy}
        rec.write_trial(status)
        return status

    monkeypatch.setattr(engine, "run_trial", fake)
    res, table = reproduce("cifar10", "cpu", out=tmp_path,
                           engine=engine.Engine(use_ray=False, progress=False, device="cpu"))
    assert sorted(res.skipped) == sorted(t.name for t in bundled)
    assert sorted(res.ran) == sorted(added)
    stems = {t.name.rsplit("_s", 1)[0]: t for t in bundled}
    grown = [stems[g] for g in sorted({n.rsplit("_s", 1)[0] for n in added})]
    grown_cem = {defense_of(t.cfg)[0] for t in grown if cem_lambda(t.cfg) > 0}
    for t in grown:  # a CEM setting, or a point of a grown CEM setting's own curve
        assert cem_lambda(t.cfg) > 0 or defense_of(t.cfg)[0] in grown_cem, t.name
    assert "cut" not in {defense_of(t.cfg)[0] for t in grown}
    assert grown_cem - {"noise"}, added  # zoo settings got seeds too
    rows = json.loads((tmp_path / "paper_table.json").read_text())
    assert table in (tmp_path / "paper_table.md").read_text()
    assert len(table.splitlines()) == len(rows) + 4  # header, rule, rows, blank, average
    for name in ZOO:
        mine = [r for r in rows if r["defense_name"] == name]
        strengths = {defense_of(t.cfg)[2] for t in bundled if defense_of(t.cfg)[0] == name
                     and not (t.cfg.cem is not None and t.cfg.cem.lam > 0)}
        assert len(mine) == 2, name  # two lambdas at the middle strength
        for r in mine:
            assert sorted(r["own_strengths"]) == sorted(strengths), name
            assert r["vs_own"] is not None and r["vs_noise"] is not None, name
            assert r["exploratory"] == (r["seeds_with"] == 1), name


def test_zoo_probe_trains_each_defense_cem_setting_at_the_probed_lambdas():
    """benchmarks/zoo_probe.py --cem: each zoo defense's curve without CEM plus its CEM
    setting (the sweep's strength) at each probed lambda, all shortened alike."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "zoo_probe.py"
    spec = importlib.util.spec_from_file_location("zoo_probe", path)
    assert spec is not None and spec.loader is not None
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    trials = probe.probe_trials(3, 1000, None, only=[], with_noise=False, cem=[1, 10])
    sweep = [t for t in expand(load_sweep(sweep_file("cifar10", "cpu"))) if t.seed == 125]
    for name in ZOO:
        mine = [t for t in trials if defense_of(t.cfg)[0] == name]
        curve = sorted(defense_of(t.cfg)[2] for t in mine if cem_lambda(t.cfg) == 0)
        want = sorted(defense_of(t.cfg)[2] for t in sweep
                      if defense_of(t.cfg)[0] == name and cem_lambda(t.cfg) == 0)
        assert curve == want and len(curve) >= 3, name
        cem = [t for t in mine if cem_lambda(t.cfg) > 0]
        assert sorted(cem_lambda(t.cfg) for t in cem) == [1.0, 10.0], name
        at = {defense_of(t.cfg)[2] for t in sweep
              if defense_of(t.cfg)[0] == name and cem_lambda(t.cfg) > 0}
        assert {defense_of(t.cfg)[2] for t in cem} == at, name
        assert len({t.name for t in cem}) == 2, name
    assert all(t.cfg.train.epochs == 3 and t.cfg.data.limit_train == 1000 for t in trials)
    assert not any(defense_of(t.cfg)[0] in ("noise", "cut") for t in trials)


def test_frontier_paper_writes_the_table_reproduce_writes_for_the_same_runs(tmp_path):
    """``splitcem frontier DIRS --paper``: the paper table of finished runs anywhere (a
    results folder), the same table and rows as :func:`paper_table` at the looks' level."""
    from splitcem.cli import app
    from splitcem.study.frontier_plan import sequential_level

    runs_dir, out = tmp_path / "runs", tmp_path / "report"
    _curve_fixture(runs_dir)
    res = CliRunner().invoke(app, ["frontier", str(runs_dir), "--looks", "3", "--paper",
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    table, rows = paper_table(find_runs([runs_dir])[0], level=sequential_level(3))
    assert table in (out / "paper_table.md").read_text()
    written = json.loads((out / "paper_table.json").read_text())
    assert [r["defense"] for r in written] == [r["defense"] for r in rows]
    wide = [r["vs_own"]["interval"] for r in written]
    assert wide == [None if r["vs_own"]["interval"] is None else list(r["vs_own"]["interval"])
                    for r in rows]
    narrow = [r["vs_own"]["interval"] for r in paper_table(find_runs([runs_dir])[0])[1]]
    assert wide != narrow  # read at the looks' level, not 95% once
    assert f"{len(rows)} CEM setting(s)" in res.output and (out / "frontier.md").is_file()


def test_list_shows_the_seeds_earlier_rounds_added(tmp_path, bundled):
    """A seed that an earlier seeds-until-decided round ran (its folder beside the first
    round's) is a trial of the sweep: ``--list`` (and ``sweep --dry-run``) show it finished,
    as ``reproduce`` counts it."""
    from splitcem.cli import app
    from splitcem.study.reproduce import list_reproduce

    t = next(t for t in bundled if t.policy is not None and cem_lambda(t.cfg) > 0)
    extra = t.with_seed(999)
    write_run(tmp_path / extra.name, extra.cfg, 0.78, 0.01)
    states, text = list_reproduce("cifar10", "cpu", out=tmp_path)
    assert len(states) == len(bundled) + 1
    assert {s.name: s.state for s in states}[extra.name] == "finished"
    assert f"1 finished, 0 adopted, 0 running, {len(bundled)} pending" in text
    res = CliRunner().invoke(app, ["sweep", str(sweep_file("cifar10", "cpu")), "--dry-run",
                                   "--out", str(tmp_path)])
    assert res.exit_code == 0, res.output
    assert res.output.startswith(text + "\n"), res.output  # the same listing
    assert any(ln.split()[:2] == [extra.name, "finished"] for ln in text.splitlines())


def test_a_pinned_run_joins_the_curve_of_runs_that_ran_its_path(tmp_path, monkeypatch):
    """A run made with --amp true where bf16 is emulated and one made with amp: auto where
    it is native both ran bf16: the paper table puts them on one curve (two seeds), as the
    frontier does; keyed by the config as written they were two one-seed curves."""
    from splitcem.study.grid import pin_amp
    from splitcem.study.paper import _run_curve

    topk = [{"name": "topk", "ratio": 0.3}, {"name": "noise", "sigma": 0.1}]
    auto = _cfg("a", 1, topk)
    _machine(monkeypatch, bf16=True)
    rec = write_run(tmp_path / "a", auto, 0.75, 0.013)  # as training records it: native bf16
    rec.save({**rec.metrics, "numerics": {**rec.metrics["numerics"], "native_bf16": True}})
    pinned = load_config(pin_amp({**auto.to_dict(), "name": "b", "seed": 2}, True))
    _machine(monkeypatch, bf16=False)
    write_run(tmp_path / "b", pinned, 0.76, 0.012)
    runs = sorted(find_runs([tmp_path])[0], key=lambda r: r.name)
    assert [r.numerics["amp"] for r in runs] == [True, True]
    assert runs[0].cfg.train.amp == "auto" and runs[1].cfg.train.amp is True
    assert _run_curve(runs[0]) == _run_curve(runs[1])
    table, rows = curve_table(runs)
    assert [r["seeds"] for r in rows] == [2], table
