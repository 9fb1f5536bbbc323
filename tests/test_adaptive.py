"""Seeds until decided (issue 18 item 4): a sweep with ``seeds: {min, max, until: decided}``
adds seeds to undecided settings and their baseline neighbours until each is decided or at
``max``, and re-running resumes. No training: a fake-cheap trial function writes each run's
record with synthetic metrics (the engine, planner and records are the real ones)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from splitcem.config import load_config
from splitcem.errors import ConfigError
from splitcem.record import RunRecord
from splitcem.study import trials as engine
from splitcem.study.adaptive import plan_round
from splitcem.study.frontier import compare, within_reach
from splitcem.study.frontier_plan import sequential_level
from splitcem.study.grid import expand, load_sweep

#: the trials one after another in this process, no progress bars
LOOP = engine.Engine(use_ray=False, progress=False)
#: a seed's effect on every run's log MSE (shared: pairing cancels it)
_EFFECT = {s: 0.3 * math.sin(1.7 * s) for s in range(200)}
#: the true gain of each lambda over the noise curve at the same accuracy
_GAIN = {1.0: 0.0, 3.0: 0.25}


#: top-k's curve over ratio (its own, 20% above noise alone's at the same accuracy) and the
#: true gain of top-k 0.4 + CEM lambda L over it
_TOPK_GAIN = {1.0: 0.0, 3.0: 0.3}


def _metrics(cfg) -> tuple[float, float]:
    """(accuracy, worst-case MSE): noise on a line from (0.80, 0.010) to (0.60, 0.030); CEM
    lambda L at accuracy 0.75 with gain _GAIN[L]; top-k over ratio 0.5 / 0.4 / 0.3 at
    accuracy 0.80 / 0.75 / 0.70 with 1.2x noise's MSE there, and top-k 0.4 + CEM lambda L at
    0.75 with gain _TOPK_GAIN[L] over top-k's curve; per-run noise 8% on MSE."""
    sigma = cfg.defenses[-1]["sigma"]
    lam = cfg.cem.lam if cfg.cem is not None else 0.0
    ratio = cfg.defenses[0].get("ratio", 0.0)
    rng = np.random.default_rng([cfg.seed, round(100 * sigma), round(10 * lam),
                                 round(100 * ratio)])
    if ratio:
        acc = 0.55 + 0.5 * ratio
        mse = 1.2 * (0.09 - 0.1 * acc) * (1 + (_TOPK_GAIN[lam] if lam else 0.0))
    elif lam:
        acc, mse = 0.75, 0.015 * (1 + _GAIN[lam])
    else:
        acc, mse = 0.9 - sigma, 0.1 * sigma
    return (acc + 0.002 * rng.normal(),
            mse * math.exp(_EFFECT[cfg.seed] + 0.08 * rng.normal()))


# what each fake trial records it took, one thread
TRAIN_S, ATTACK_S = 600.0, 300.0
TRIAL_H = (TRAIN_S + ATTACK_S) / 3600  # core-hours


@pytest.fixture
def fake_trials(monkeypatch):
    """The engine's trial function, replaced by one that writes a finished record."""
    calls: list[str] = []

    def fake(cfg_dict, run_dir, *, threads=1, meta=None, device=None, progress=False,
             ship=False):
        cfg = load_config(cfg_dict)
        calls.append(cfg.name)
        rec = RunRecord.begin_training(run_dir, cfg, resume=False, device="cpu")
        acc, mse = _metrics(cfg)
        rec = rec.finish_training({**rec.metrics, "train": {"epochs": cfg.train.epochs,
                                                             "test_accuracy": acc,
                                                             "seconds": TRAIN_S}})
        rec.record_attacks({"attacks": {"decoder": {"metrics": {"mse": mse}}},
                            "worst": {"mse": {"value": mse, "attack": "decoder"}},
                            "seconds": ATTACK_S}, cfg, device="cpu")
        status = {**(meta or {}), "status": "finished", "accuracy": acc}
        rec.write_trial(status)
        return status

    monkeypatch.setattr(engine, "run_trial", fake)
    return calls


def _sweep(tmp_path, max_seeds: int = 6) -> dict:
    (tmp_path / "base.yaml").write_text(
        "name: tiny\nseed: 10\ndevice: cpu\ntrain: {epochs: 1}\n"
        "defenses: [{name: noise, sigma: 0.1}]\n"
        "attack: {attacks: [{name: decoder, epochs: 1}]}\n")
    policy = {"min": 2, "max": max_seeds, "until": "decided"}
    return {"name": "tiny", "base": str(tmp_path / "base.yaml"), "seeds": 2, "variants": [
        {"name": "noise{sigma}", "grid": {"defenses.0.sigma": [0.1, 0.2, 0.3]}},
        {"name": "cem{lambda}", "set": {"cem": {"lambda": 1.0}},
         "grid": {"cem.lambda": [1.0, 3.0]}, "seeds": policy}]}


def _cells(out):
    cells: dict = {}
    for rec in RunRecord.find([out]):
        stem, seed = rec.path.name.rsplit("_s", 1)
        cells.setdefault(stem, {})[int(seed)] = (rec.accuracy, rec.attacks["worst"]["mse"]
                                                 ["value"])
    return cells


def test_seeds_until_decided_then_resume(tmp_path, fake_trials):
    spec = _sweep(tmp_path)
    out = tmp_path / "out"
    res = engine.run_grid(spec, out=out, engine=LOOP)
    cells = _cells(out)
    base = {k: v for k, v in cells.items() if k.startswith("noise")}
    for lam in ("cem1", "cem3"):
        c = compare(base, cells[lam], level=sequential_level(5))  # the planner's level
        # every adaptive setting ends decided, at max, or with a decision out of reach of
        # max at the spread seen; none passes max
        assert c.decided or len(cells[lam]) == 6 or not within_reach(c, 6), (lam, c)
        assert 2 <= len(cells[lam]) <= 6
    # the true +25% is decided (more private) after more seeds than min; the null one is
    # never decided and stops before max, once no 6 seeds would decide it
    assert compare(base, cells["cem3"]).verdict == "more private" and len(cells["cem3"]) > 2
    assert compare(base, cells["cem1"]).verdict == "undecided" and len(cells["cem1"]) < 6
    # the frontier says how many seeds each verdict rests on
    from splitcem.study.frontier_report import write_frontier

    m = {c["strength"]: c for c in write_frontier([out], tmp_path / "front")["matched"]}
    assert m[3.0]["n_seeds"] == len(cells["cem3"]) and m[3.0]["verdict"] == "more private"
    assert m[1.0]["n_seeds"] == len(cells["cem1"]) and m[1.0]["verdict"] == "undecided"
    # the planner judged each look at the level spread over the policy's 5 looks (2..6
    # seeds), and the frontier reads the study that way with --looks 5: a wider interval
    level = sequential_level(5)
    from splitcem.study.adaptive import looks

    assert looks(expand(load_sweep(spec))) == 5  # what sweep / reproduce read their study with
    assert compare(base, cells["cem3"], level=level).verdict == "more private"
    seq = write_frontier([out], tmp_path / "front5", looks=5)
    m5 = {c["strength"]: c for c in seq["matched"]}
    assert seq["level"] == pytest.approx(0.99) and m5[3.0]["verdict"] == "more private"
    assert m5[3.0]["low"] < m[3.0]["low"] and m5[3.0]["high"] > m[3.0]["high"]
    assert "99%" in (tmp_path / "front5" / "frontier.md").read_text()
    # the new seeds are paired: the noise points around 0.75 (sigma 0.1, 0.2) ran them too
    added = set(cells["cem1"]) | set(cells["cem3"])
    assert added <= set(cells["noise0.1"]) & set(cells["noise0.2"])
    assert set(cells["noise0.3"]) == {10, 11}  # not a neighbour: min seeds only
    assert sorted(res.ran) == sorted(fake_trials) and len(res.ran) == sum(map(len,
                                                                              cells.values()))
    new, notes = plan_round(expand(load_sweep(spec)), out)
    assert new == [] and notes  # nothing left to decide

    # re-running resumes: the rounds' runs are found, nothing runs again
    n = len(fake_trials)
    again = engine.run_grid(spec, out=out, engine=LOOP)
    assert len(fake_trials) == n and again.ran == []
    assert len(again.statuses) == len(res.statuses)

    # a run of a later round lost (killed): only it runs again
    lost = sorted(s for s in cells["cem1"] if s > 11)
    if lost:
        (out / f"cem1_s{lost[-1]}" / "metrics.json").unlink()
        again = engine.run_grid(spec, out=out, engine=LOOP)
        assert again.ran == [f"cem1_s{lost[-1]}"]


def test_schedule_refills_a_free_slot_while_the_last_jobs_run():
    """The engine's scheduler on a simulated clock: 2 slots, jobs of unequal length; when a
    slot frees with nothing queued, ``refill`` is asked once (not again until another job
    ends) and its jobs start at once, so no slot idles while there is work."""
    from splitcem.study.trials import schedule

    now = 0.0
    ends: dict[str, float] = {}
    asked: list[tuple[float, list[str]]] = []
    batches = [[("d", 3.0), ("e", 1.0)], [], [("f", 1.0)]]

    def submit(job):
        ends[job[0]] = now + job[1]
        return job[0]

    def wait_one(running):
        nonlocal now
        first = min(running, key=ends.__getitem__)
        now = ends[first]
        return first

    def refill():
        asked.append((now, sorted(n for n in ends if ends[n] > now)))
        return batches.pop(0) if batches else []

    schedule([("a", 1.0), ("b", 4.0), ("c", 1.0)], 2, submit, wait_one, refill)
    # a ends at 1: c starts; c ends at 2 with b running to 4: refill then, d starts in the
    # free slot; b ends at 4: e starts; d and e end at 5: each end asks again (the empty
    # answer, then f); f ends at 6, and the last ask finds nothing
    assert ends == {"a": 1.0, "b": 4.0, "c": 2.0, "d": 5.0, "e": 5.0, "f": 6.0}, ends
    assert asked == [(2.0, ["b"]), (5.0, []), (5.0, []), (6.0, [])], asked
    assert batches == []  # a refill only after every job had ended would end at 7, not 6


def test_a_round_is_planned_while_the_last_trials_run_and_busy_settings_wait(
        tmp_path, fake_trials, monkeypatch):
    """Seeds until decided on an engine with 2 slots (a fake one: a job "runs" when it is
    waited for): each round is planned when a slot is free and nothing is queued, while
    trials are still in flight; the settings with a trial in flight (or a baseline run in
    flight) wait for a later round; no trial runs twice and the verdicts are those of the
    loop that plans only between rounds (test above)."""
    from splitcem.study.trials import run_trial, schedule

    flight: list[str] = []
    early: list[tuple[list[str], list[str]]] = []

    def fake_ray(jobs, *, on_done, refill=None, **_):
        def submit(job):
            flight.append(job[0].name)
            return job

        def wait_one(running):
            t, path, meta = running[0]
            on_done(t, run_trial(t.cfg.to_dict(), str(path), meta=meta))
            flight.remove(t.name)
            return running[0]

        def asked():
            new = refill() if refill is not None else []
            early.append((list(flight), [j[0].name for j in new]))
            return new

        schedule(jobs, 2, submit, wait_one, asked)

    monkeypatch.setattr(engine, "_execute_ray", fake_ray)
    out = tmp_path / "out"
    engine.run_grid(_sweep(tmp_path), out=out, engine=engine.Engine(progress=False))
    assert len(fake_trials) == len(set(fake_trials))  # no trial twice
    planned = [(busy, new) for busy, new in early if busy and new]
    assert planned, early  # some round started while a trial was still in flight
    for busy, new in planned:
        stems = {n.rsplit("_s", 1)[0] for n in busy}
        new_stems = {n.rsplit("_s", 1)[0] for n in new}
        assert not stems & new_stems, (busy, new)
        if any(s.startswith("noise") for s in stems):  # the CEM settings' baseline is busy
            assert not new, (busy, new)
    cells = _cells(out)
    base = {k: v for k, v in cells.items() if k.startswith("noise")}
    assert compare(base, cells["cem3"]).verdict == "more private"
    assert compare(base, cells["cem1"]).verdict == "undecided"
    assert all(2 <= len(cells[c]) <= 6 for c in ("cem1", "cem3"))

    # the planner's rule itself, after min seeds: a setting in flight waits, and so does
    # every setting whose baseline (here the noise curve) has a run in flight
    trials = expand(load_sweep(_sweep(tmp_path)))
    engine.run_trials(trials, tmp_path / "min", engine=LOOP)
    free = {t.name.rsplit("_s", 1)[0] for t in plan_round(trials, tmp_path / "min")[0]}
    assert {"cem3", "noise0.1"} <= free, free
    new, notes = plan_round(trials, tmp_path / "min", busy={"cem3"})
    assert "cem3" not in {t.name.rsplit("_s", 1)[0] for t in new}
    assert ("'cem3': waits for the trials left of cem3 (running or queued), then its next "
            "seed is planned") in notes
    assert not any(n.startswith("'cem1': waits") for n in notes)
    new, notes = plan_round(trials, tmp_path / "min", busy={"noise0.2"})
    assert new == []  # and the listing says why, setting by setting
    assert {n.split(":")[0] for n in notes if "waits for the trials left of noise0.2 " in n} == \
        {"'cem1'", "'cem3'"}, notes


def test_every_setting_is_planned_at_the_level_the_report_reads(tmp_path, fake_trials):
    """Settings with fewer looks than the sweep's most (here 3 against 5) are judged by the
    planner at the report's level (``looks`` of the sweep), not their own: at their own,
    the planner could stop seeding a setting that the report still reads undecided."""
    spec = _sweep(tmp_path)
    spec["variants"][1]["grid"] = {"cem.lambda": [1.0]}
    spec["variants"].append({"name": "wide{lambda}", "set": {"cem": {"lambda": 3.0}},
                             "grid": {"cem.lambda": [3.0]},
                             "seeds": {"min": 2, "max": 4, "until": "decided"}})
    trials = expand(load_sweep(spec))
    from splitcem.study.adaptive import looks

    assert looks(trials) == 5 and {t.policy.looks for t in trials if t.policy} == {5, 3}
    engine.run_trials(trials, tmp_path / "out", engine=LOOP)  # min seeds, no rounds
    cells = _cells(tmp_path / "out")
    base = {k: v for k, v in cells.items() if k.startswith("noise")}

    def shown(n_looks: int) -> str:
        c = compare(base, cells["wide3"], level=sequential_level(n_looks))
        return f"[{100 * c.low:+.1f}%, {100 * c.high:+.1f}%]"

    assert shown(5) != shown(3)  # the two levels read differently here
    _, notes = plan_round(trials, tmp_path / "out")
    (note,) = [n for n in notes if n.startswith("'wide3'")]
    assert shown(5) in note and shown(3) not in note, note


def test_fixed_seeds_add_nothing(tmp_path, fake_trials):
    spec = _sweep(tmp_path)
    spec["variants"][1]["seeds"] = 2
    engine.run_grid(spec, out=tmp_path / "out", engine=LOOP)
    assert len(fake_trials) == 3 * 2 + 2 * 2


@pytest.mark.parametrize("seeds, match", [
    ({"min": 3, "max": 2}, "at most max"),
    ({"min": 2, "until": "forever"}, "until"),
    ({"mn": 2}, "unknown key"),
])
def test_bad_seed_policies_fail_before_running(tmp_path, seeds, match):
    spec = _sweep(tmp_path)
    spec["variants"][1]["seeds"] = seeds
    with pytest.raises(ConfigError, match=match):
        expand(load_sweep(spec))


def test_dry_run_lists_finished_adopted_and_pending(tmp_path, fake_trials):
    import yaml
    from typer.testing import CliRunner

    from splitcem.cli import app
    from splitcem.study.listing import list_sweep

    spec = _sweep(tmp_path)
    spec["variants"][1]["seeds"] = 2
    done = tmp_path / "done"
    engine.run_trials(expand(load_sweep(spec))[:3], done, engine=LOOP)
    n = len(fake_trials)
    states, _ = list_sweep(load_sweep(spec), done)
    assert [s.state for s in states].count("finished") == 3
    rows = {s.name: s for s in list_sweep(load_sweep(spec), tmp_path / "new", adopt=[done])[0]}
    assert rows["noise0.1_s10"].state == "adopted"
    assert rows["noise0.1_s10"].note == f"from {done / 'noise0.1_s10'}"
    assert rows["cem1_s11"].state == "pending"
    assert len(fake_trials) == n and not (tmp_path / "new").exists()  # nothing ran or written

    spec["variants"][1]["seeds"] = {"min": 2, "max": 4, "until": "decided"}
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(spec))
    res = CliRunner().invoke(app, ["sweep", str(tmp_path / "s.yaml"), "--dry-run", "--out",
                                   str(tmp_path / "new"), "--adopt", str(done)])
    assert res.exit_code == 0, res.output
    assert "0 finished, 3 adopted, 0 running, 7 pending, 0 failed of 10 trials" in res.output, \
        res.output
    assert "core-hours left: about" in res.output  # from the adopted runs' recorded times
    lines = {ln.split()[0]: ln for ln in res.output.splitlines() if ln.strip()}
    assert lines["cem1_s11"].endswith("[seeds 2..4 until decided]")
    assert "[" not in lines["noise0.1_s10"]


def test_a_fresh_out_that_adopts_an_earlier_sweep_starts_where_it_stood(tmp_path,
                                                                        fake_trials):
    """A sweep into a new folder with ``--adopt`` of an earlier sweep's runs (e.g. the
    committed results/) that had added seeds in rounds: ``--list`` shows those seeds as
    adopted and plans the next round from them, as it would in the earlier folder, and the
    run copies them, ending with the runs the earlier folder would have ended with."""
    from splitcem.study.listing import list_sweep

    spec = _sweep(tmp_path)
    trials = expand(load_sweep(spec))
    old = tmp_path / "old"
    engine.run_trials(trials, old, engine=LOOP)  # min seeds, then one round by hand
    round1, _ = plan_round(trials, old)
    assert round1
    engine.run_trials([*trials, *round1], old, engine=LOOP)
    round2, notes2 = plan_round(trials, old)
    assert {t.name for t in round2}.isdisjoint(t.name for t in round1)

    new = tmp_path / "new"
    states, text = list_sweep(load_sweep(spec), new, adopt=[old])
    assert {s.name for s in states} == {t.name for t in [*trials, *round1]}
    assert {s.state for s in states} == {"adopted"}
    # the next round's trials at the finished ones' recorded cost (all runs alike here)
    assert f"adds {len(round2)} trial(s) (about {len(round2) * TRIAL_H:.1f} core-hours, " \
        "estimated as above)" + (f": {', '.join(t.name for t in round2)}" if round2 else "") \
        in text, text
    assert text.endswith("\n".join(f"  {n}" for n in notes2))
    assert not new.exists()  # the listing writes nothing

    n = len(fake_trials)
    res = engine.run_grid(spec, out=new, engine=engine.Engine(use_ray=False, progress=False,
                                                              adopt=(old,)))
    assert set(res.adopted) >= {t.name for t in round1}
    assert {t.name for t in round1}.isdisjoint(fake_trials[n:])  # copied, never rerun
    fake_trials.clear()
    engine.run_grid(spec, out=old, engine=LOOP)  # the earlier folder, continued
    assert sorted(p.name for p in new.iterdir() if p.is_dir()) == \
        sorted(p.name for p in old.iterdir() if p.is_dir())


def test_a_round_trial_killed_before_it_finished_is_listed_and_resumed_first(tmp_path,
                                                                             fake_trials):
    """A sweep killed mid-round leaves a trial that round started (its folder, config and
    trial.json) unfinished: ``--list`` shows it (pending: its process is gone) and does not
    plan it again, and re-running the sweep runs it before planning anything new."""
    import subprocess
    import sys

    from splitcem.study.listing import list_sweep

    spec = _sweep(tmp_path)
    trials = expand(load_sweep(spec))
    out = tmp_path / "out"
    engine.run_trials(trials, out, engine=LOOP)
    (first, *_), _ = plan_round(trials, out)
    gone = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True).stdout.strip()
    rec = RunRecord.begin_training(out / first.name, first.cfg, resume=False, device="cpu")
    rec.write_trial({"name": first.name, "status": "running", "pid": int(gone),
                     "host": __import__("socket").gethostname()})
    states, text = list_sweep(load_sweep(spec), out)
    row = {s.name: s for s in states}[first.name]
    assert row.state == "pending", row
    assert first.name not in text.split("adds", 1)[1].splitlines()[0], text
    n = len(fake_trials)
    engine.run_grid(spec, out=out, engine=LOOP)
    assert fake_trials[n] == first.name, fake_trials[n:]


def test_list_shows_the_round_a_live_sweep_has_queued(tmp_path, fake_trials, monkeypatch,
                                                     caplog):
    """A live sweep writes the round it plans into its index before the round's trials
    start: while one of them runs here, ``--list`` shows the others as pending, queued, and
    plans the next round with them as busy; once its process is gone, ``--list`` still shows
    them (queued by the sweep that stopped), and the restarted sweep runs the round where it
    stopped, the started trial first, then the others in their planned order, before it plans
    a round of its own (none of them is planned again)."""
    import os
    import socket

    from splitcem.study.listing import list_sweep

    spec = _sweep(tmp_path)
    trials = expand(load_sweep(spec))
    out = tmp_path / "out"
    engine.run_trials(trials, out, engine=LOOP)
    new, _ = plan_round(trials, out)
    assert len(new) >= 2, new

    class Killed(Exception):
        pass

    def starts_then_dies(cfg_dict, run_dir, *, meta=None, **_):  # the sweep, frozen mid-round
        rec = RunRecord.begin_training(run_dir, load_config(cfg_dict), resume=False,
                                       device="cpu")
        rec.write_trial({**(meta or {}), "status": "running", "pid": os.getpid(),
                         "host": socket.gethostname()})
        raise Killed

    fake = engine.run_trial
    monkeypatch.setattr(engine, "run_trial", starts_then_dies)
    with pytest.raises(Killed):  # under the sweep's name, as run_grid runs its rounds
        engine.run_trials(new, out, name="tiny", engine=LOOP)
    states, text = list_sweep(load_sweep(spec), out)
    by_name = {s.name: s for s in states}
    assert by_name[new[0].name].state == "running", by_name[new[0].name]
    for t in new[1:]:
        assert not (out / t.name).exists()
        assert (by_name[t.name].state, by_name[t.name].note) == \
            ("pending", "queued by the sweep running here"), by_name.get(t.name)
    planned = text.split("adds", 1)[1].splitlines()[0]
    assert not any(t.name in planned for t in new), planned

    # the sweep is gone (pid -1: no process; os.kill(-1, 0) alone would say "alive")
    RunRecord.load(out / new[0].name).write_trial({"status": "running", "pid": -1,
                                                  "host": socket.gethostname()})
    states, _ = list_sweep(load_sweep(spec), out)
    by_name = {s.name: s for s in states}
    for t in new[1:]:
        assert (by_name[t.name].state, by_name[t.name].note) == \
            ("pending", "queued by the sweep that stopped (it runs them first when "
                        "restarted)"), by_name.get(t.name)

    # the stopped round is this sweep's queue; an index another sweep wrote is not
    assert engine.queued(out, sweep="tiny") == [t.name for t in new]
    assert engine.queued(out, sweep="another") == []

    monkeypatch.setattr(engine, "run_trial", fake)
    n = len(fake_trials)
    with caplog.at_level("INFO", logger="splitcem.study.adaptive"):
        engine.run_grid(spec, out=out, engine=LOOP)
    assert fake_trials[n:n + len(new)] == [t.name for t in new], fake_trials[n:]
    rounds = [r.getMessage() for r in caplog.records if "seeds until decided, round" in
              r.getMessage()]
    assert not [m for m in rounds if any(t.name in m for t in new)], rounds
    assert engine.queued(out, sweep="tiny") == []  # the sweep ended with nothing queued


@pytest.mark.parametrize("sigmas", [(0.1, 0.2, 0.3), (0.2, 0.3)])
def test_tune_confirm_seeds_until_decided(tmp_path, fake_trials, sigmas):
    """``splitcem tune --confirm-seeds N``: the recommendation (CEM lambda 3, true gain +25%)
    and the noise settings around its accuracy get one more seed at a time until the gain is
    decided or N seeds ran; a second call pays for nothing. Without a noise point more
    accurate than it (sigmas 0.2 and 0.3 only), noise at its own sigma runs first, on its
    seed, so that it can be compared at all. A neighbour's run of the seed the recommendation
    gets next is reused."""
    import yaml

    from splitcem.study import tune_confirm
    from splitcem.study.grid import Trial
    from splitcem.study.space import load_space
    from splitcem.study.tune import TuneResult, _observation
    from splitcem.study.tune_report import gain_over_noise, recommend, settings

    base = load_config({"name": "tiny", "seed": 10, "device": "cpu", "train": {"epochs": 1},
                        "defenses": [{"name": "noise", "sigma": 0.1}],
                        "attack": {"attacks": [{"name": "decoder", "epochs": 1}]}}).to_dict()
    sigma = {"low": 0.05, "high": 0.5}
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"families": {
        "noise": {"set": {"defenses.0.sigma": sigma, "cem.lambda": 0.0}},
        "cem": {"set": {"defenses.0.sigma": 0.1, "cem.lambda": {"low": 1.0, "high": 3.0}}}}}))
    space = load_space(tmp_path / "space.yaml", base)
    points = [("noise", {"defenses.0.sigma": s}) for s in sigmas]
    points.append(("cem", {"cem.lambda": 3.0}))
    runs = [(f, v, 10) for f, v in points] + [("noise", {"defenses.0.sigma": 0.2}, 11)]
    trials = [Trial(f"{space.label(f, v)}_s{k}", space.config(base, f, v,
                    name=f"{space.label(f, v)}_s{k}", seed=k), k, v, f) for f, v, k in runs]
    engine.run_trials(trials, tmp_path / "trials", engine=LOOP)
    result = TuneResult(tmp_path, budget=0.72, reference_accuracy=0.8, observations=[
        _observation(RunRecord.load(tmp_path / "trials" / t.name), t.variant, t.values, "tune")
        for t in trials])
    tuned = len(fake_trials)

    tune_confirm.confirm(result, space, base, 8, engine=LOOP)
    sets = settings(result.observations, space)
    best = recommend(sets, result.budget)[0]
    cmp = gain_over_noise(best, sets)
    assert best.family == "cem" and cmp is not None
    assert cmp.decided and cmp.verdict == "more private", cmp.to_dict()
    n = len(best.seeds)
    assert 2 < n < 8 and best.seeds == list(range(10, 10 + n))  # one seed per round, stopped
    added = fake_trials[tuned:]  # the recommendation and its noise neighbours, never others
    assert len(added) >= 2 * (n - 1) and all(a.startswith(("cem_", "noise_")) for a in added)
    assert not any(a.startswith("noise_sigma=0.3") for a in added)  # far from 0.75 accuracy
    if 0.1 not in sigmas:  # out of noise's range: the bracketing point first, then seeds
        assert added[0] == "noise_sigma=0.1_s10", added
    # seed 11 of noise 0.2 (a neighbour) ran already: reused, not paid again
    assert "cem_lambda=3_s11" in added and "noise_sigma=0.2_s11" not in added

    again = len(fake_trials)
    tune_confirm.confirm(result, space, base, 8, engine=LOOP)  # decided already: runs nothing
    assert len(fake_trials) == again


def test_tune_confirm_stops_when_a_decision_is_out_of_reach(tmp_path, fake_trials, caplog):
    """A recommendation with no true gain (CEM lambda 1) is not seeded to ``--confirm-seeds``:
    from 3 seeds on, once the spread seen says that no 2 x 8 seeds would decide it, the
    confirmation stops with it undecided (and says so)."""
    import logging

    import yaml

    from splitcem.study import tune_confirm
    from splitcem.study.grid import Trial
    from splitcem.study.space import load_space
    from splitcem.study.tune import TuneResult, _observation
    from splitcem.study.tune_report import gain_over_noise, recommend, settings

    base = load_config({"name": "tiny", "seed": 10, "device": "cpu", "train": {"epochs": 1},
                        "defenses": [{"name": "noise", "sigma": 0.1}],
                        "attack": {"attacks": [{"name": "decoder", "epochs": 1}]}}).to_dict()
    (tmp_path / "space.yaml").write_text(yaml.safe_dump({"families": {
        "noise": {"set": {"defenses.0.sigma": {"low": 0.05, "high": 0.5}, "cem.lambda": 0.0}},
        "cem": {"set": {"defenses.0.sigma": 0.1, "cem.lambda": {"low": 1.0, "high": 3.0}}}}}))
    space = load_space(tmp_path / "space.yaml", base)
    points = [("noise", {"defenses.0.sigma": s}) for s in (0.1, 0.2, 0.3)]
    points.append(("cem", {"cem.lambda": 1.0}))
    trials = [Trial(f"{space.label(f, v)}_s10", space.config(base, f, v,
                    name=f"{space.label(f, v)}_s10", seed=10), 10, v, f) for f, v in points]
    engine.run_trials(trials, tmp_path / "trials", engine=LOOP)
    result = TuneResult(tmp_path, budget=0.72, reference_accuracy=0.8, observations=[
        _observation(RunRecord.load(tmp_path / "trials" / t.name), t.variant, t.values, "tune")
        for t in trials])

    with caplog.at_level(logging.INFO, logger="splitcem.study.tune_confirm"):
        tune_confirm.confirm(result, space, base, 8, engine=LOOP)
    sets = settings(result.observations, space)
    best = recommend(sets, result.budget)[0]
    cmp = gain_over_noise(best, sets, level=sequential_level(7))
    assert best.family == "cem" and cmp is not None and cmp.verdict == "undecided"
    assert 3 <= len(best.seeds) < 8 and not within_reach(cmp, 8), cmp.to_dict()
    assert "out of reach of 8 seeds" in caplog.text
    from splitcem.study import tune_report

    result.looks = 7  # as the tune sets it for --confirm-seeds 8
    tune_report.write(result, space, mode="constrained")
    assert "a decision is out of reach of `--confirm-seeds 8`" in (tmp_path / "tune.md").read_text()


def test_a_zoo_setting_with_cem_is_decided_against_its_own_curve(tmp_path, fake_trials):
    """Issue 19: top-k + CEM gets seeds until decided against top-k without CEM (its own
    curve, whose points around its accuracy get the same seeds), not against noise alone:
    one seed everywhere first, the true +30% decided, the null lambda stopped at max."""
    spec = _sweep(tmp_path)
    spec["variants"][1]["seeds"] = 2
    (tmp_path / "topk.yaml").write_text(
        "name: tiny\nseed: 10\ndevice: cpu\ntrain: {epochs: 1}\n"
        "defenses: [{name: topk, ratio: 0.3}, {name: noise, sigma: 0.1}]\n"
        "attack: {attacks: [{name: decoder, epochs: 1}]}\n")
    topk = str(tmp_path / "topk.yaml")
    policy = {"min": 1, "max": 5, "until": "decided"}
    spec["variants"] += [
        {"name": "topk{ratio}", "base": topk, "grid": {"defenses.0.ratio": [0.5, 0.4, 0.3]},
         "seeds": 1},
        {"name": "topk{ratio}_cem{lambda}", "base": topk, "set": {"cem": {"lambda": 1.0}},
         "grid": {"defenses.0.ratio": [0.4], "cem.lambda": [1.0, 3.0]}, "seeds": policy}]
    out = tmp_path / "out"
    engine.run_grid(spec, out=out, engine=LOOP)
    cells = _cells(out)
    curve = {k: v for k, v in cells.items() if k in ("topk0.5", "topk0.4", "topk0.3")}
    level = sequential_level(5)
    strong = compare(curve, cells["topk0.4_cem3"], level=level)
    assert strong.verdict == "more private" and 2 <= len(cells["topk0.4_cem3"]) <= 5, strong
    null = compare(curve, cells["topk0.4_cem1"], level=level)
    assert null.verdict != "more private" or len(cells["topk0.4_cem1"]) == 5
    # the new seeds paired with top-k's points around 0.75, never with noise alone's curve
    added = (set(cells["topk0.4_cem1"]) | set(cells["topk0.4_cem3"])) - {10}
    assert added and added <= set(cells["topk0.4"])
    assert added <= set(cells["topk0.5"]) | set(cells["topk0.3"])
    assert set(cells["noise0.1"]) == {10, 11}  # noise alone: its 2 fixed seeds only
    # against noise alone the same top-k + CEM runs would be judged otherwise (top-k's curve
    # is 20% above noise's): the planner used the own curve
    noise = {k: v for k, v in cells.items() if k.startswith("noise")}
    assert compare(noise, cells["topk0.4_cem3"], level=level).gain > strong.gain + 0.1


def _two_zoo_defenses(tmp_path) -> dict:
    """Noise alone, and two top-k curves ("a", "b") each with a CEM setting seeded until
    decided (min 1, max 3): "a" with no true gain over its curve (first by name and in the
    file), "b" with +30%."""
    for tag, sigma in (("a", 0.1), ("b", 0.12)):
        (tmp_path / f"{tag}.yaml").write_text(
            "name: tiny\nseed: 10\ndevice: cpu\ntrain: {epochs: 1}\n"
            f"defenses: [{{name: topk, ratio: 0.3}}, {{name: noise, sigma: {sigma}}}]\n"
            "attack: {attacks: [{name: decoder, epochs: 1}]}\n")
    (tmp_path / "noise.yaml").write_text(
        "name: tiny\nseed: 10\ndevice: cpu\ntrain: {epochs: 1}\n"
        "defenses: [{name: noise, sigma: 0.1}]\n"
        "attack: {attacks: [{name: decoder, epochs: 1}]}\n")
    policy = {"min": 1, "max": 3, "until": "decided"}
    variants: list[dict] = [{"name": "noise{sigma}", "base": str(tmp_path / "noise.yaml"),
                             "grid": {"defenses.0.sigma": [0.1, 0.2, 0.3]}, "seeds": 1}]
    for tag, lam in (("a", 1.0), ("b", 3.0)):
        base = str(tmp_path / f"{tag}.yaml")
        variants += [
            {"name": f"{tag}_topk{{ratio}}", "base": base,
             "grid": {"defenses.0.ratio": [0.5, 0.4, 0.3]}, "seeds": 1},
            {"name": f"{tag}_topk{{ratio}}_cem{{lambda}}", "base": base,
             "set": {"cem": {"lambda": lam}},
             "grid": {"defenses.0.ratio": [0.4], "cem.lambda": [lam]}, "seeds": policy}]
    return {"name": "tiny", "base": str(tmp_path / "a.yaml"), "variants": variants}


def test_a_round_runs_the_cheapest_decision_first(tmp_path, fake_trials):
    """Issue 19 ("cheapest decisions first"): after one seed everywhere (no spread yet), the
    next round starts with the defense whose CEM setting is furthest from its own curve (at a
    common spread the fewest seeds to decide), not in file or name order."""
    out = tmp_path / "out"
    trials = expand(load_sweep(_two_zoo_defenses(tmp_path)))
    first = [t.name for t in trials]
    engine.run_trials(trials, out, engine=LOOP)  # one seed everywhere, no rounds
    cells = _cells(out)
    gains = {tag: compare({k: v for k, v in cells.items() if k.startswith(f"{tag}_topk0.")
                           and "cem" not in k}, cells[f"{tag}_topk0.4_cem{lam:g}"]).gain
             for tag, lam in (("a", 1.0), ("b", 3.0))}
    ahead = max(gains, key=lambda t: abs(math.log1p(gains[t])))
    assert ahead == "b", gains  # the fixture's effects: the true +30% reads furthest
    new, _ = plan_round(trials, out)
    assert new and {t.name[0] for t in new} == {"a", "b"}, [t.name for t in new]
    assert new[0].name.startswith("b_"), [t.name for t in new]
    order = [t.name[0] for t in new]
    assert order == sorted(order, key=lambda c: c != "b")  # all of b's before any of a's
    zoo = [n[0] for n in first if n[0] in "ab"]
    assert zoo[0] == "a"  # the file (and names) would put "a" first


def test_per_round_caps_a_round_and_changes_the_order_not_the_outcome(tmp_path, fake_trials):
    """A sweep file's ``per_round: 1``: a round grows only the setting closest to a
    decision across both baselines (the other waits, and the notes say so; uncapped, the
    same round grows both: the test above); in the end the runs are the same as without
    the cap, in another order (the two defenses' plans share no runs)."""
    spec = _two_zoo_defenses(tmp_path)
    trials = expand(load_sweep(spec))
    engine.run_trials(trials, tmp_path / "one", engine=LOOP)
    new, notes = plan_round(trials, tmp_path / "one", per_round=1)
    assert new and {t.name[0] for t in new} == {"b"}, [t.name for t in new]
    assert any(n.startswith("'a_topk0.4_cem1'") and "waits for a later round" in n
               for n in notes), notes
    from splitcem.study.listing import list_sweep  # --list / --dry-run show that plan

    text = list_sweep(load_sweep({**spec, "per_round": 1}), tmp_path / "one")[1]
    assert f"at most 1 setting(s) per round; the next round, planned from the runs finished " \
        f"so far (here or to adopt), adds {len(new)} trial(s) (about " \
        f"{len(new) * TRIAL_H:.1f} core-hours, estimated as above): " \
        f"{', '.join(t.name for t in new)}\n" in text, text
    assert text.endswith("\n".join(f"  {n}" for n in notes))
    first = len(trials)
    ran = {}
    for cap in (None, 1):
        fake_trials.clear()
        engine.run_grid({**spec, **({"per_round": cap} if cap else {})},
                        out=tmp_path / f"cap{cap}", engine=LOOP)
        ran[cap] = list(fake_trials[first:])  # the rounds after one seed everywhere
    assert sorted(ran[1]) == sorted(ran[None]) and len({n[0] for n in ran[1]}) == 2, ran
    tags = [n[0] for n in ran[1]]
    assert tags == sorted(tags, key=lambda c: c != "b"), tags  # b to its end, then a


@pytest.mark.parametrize("value", [0, -1, "4", True, 1.5])
def test_a_bad_per_round_fails_before_running(tmp_path, value):
    with pytest.raises(ConfigError, match="per_round must be an integer >= 1"):
        load_sweep({**_sweep(tmp_path), "per_round": value})
