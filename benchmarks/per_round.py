"""What ``per_round`` does to a sweep that stops early: decisions per core-hour, simulated.

A zoo-like sweep (noise alone over sigma; ``--defenses`` top-k curves over ratio, each with
a CEM setting at its middle strength seeded until decided against that curve, min 1, max 5;
true gains over the curve spread from 0 to +40%) runs through splitcem's own engine pieces
(:func:`splitcem.study.adaptive.run_until_decided` planning, :func:`splitcem.study.trials.
schedule` keeping ``--slots`` trials in flight) on a simulated clock: a trial takes one time
unit (jittered by 20%) and writes its run record with synthetic metrics (per-seed effect
shared by every cell of that seed, per-run noise 8% on MSE, as ``tests/test_adaptive.py``).
No training: it measures the scheduling, not a model.

For each ``per_round`` (``--per-round``, ``0`` for no cap) the sweep is cut at each budget
(``--budgets``, time units after the first seed everywhere: a session that stops) and the
settings the planner then reads decided are counted (its notes, at the report's level), and
once run to the end: the trials it took and the time. The same ``--studies`` studies (true
gains and noise) for every value.

Usage::

    python benchmarks/per_round.py [--studies 20] [--per-round 0 4 1] [--slots 2]

The last stdout line is one JSON object: ``per_round{P}_decided_at{B}`` (mean decided
settings at budget B), ``per_round{P}_decided_end``, ``per_round{P}_trials_end`` (mean
trials after the first seeds), ``per_round{P}_time_end`` (time units), and ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from splitcem.config import RunConfig
from splitcem.record import RunRecord
from splitcem.study.adaptive import plan_round, run_until_decided
from splitcem.study.grid import Trial, expand, load_sweep
from splitcem.study.trials import GridResult, Job, schedule

_BASE = ("name: sim\nseed: 10\ndevice: cpu\ntrain: {{epochs: 1}}\n"
         "defenses: [{defenses}]\nattack: {{attacks: [{{name: decoder, epochs: 1}}]}}\n")


def _spec(folder: Path, gains: list[float], per_round: int | None) -> dict[str, Any]:
    """Noise alone over sigma and one top-k curve + CEM setting per gain."""
    (folder / "noise.yaml").write_text(_BASE.format(defenses="{name: noise, sigma: 0.1}"))
    variants: list[dict[str, Any]] = [{"name": "noise{sigma}", "base": str(folder / "noise.yaml"),
                                       "grid": {"defenses.0.sigma": [0.1, 0.2, 0.3]}}]
    for i, _ in enumerate(gains):
        base = folder / f"d{i}.yaml"  # each defense its own context (sigma) -> its own curve
        base.write_text(_BASE.format(defenses="{name: topk, ratio: 0.4}, "
                                     f"{{name: noise, sigma: {0.1 + 0.01 * i:.2f}}}"))
        variants += [
            {"name": f"d{i}_topk{{ratio}}", "base": str(base),
             "grid": {"defenses.0.ratio": [0.5, 0.4, 0.3]}},
            {"name": f"d{i}_topk{{ratio}}_cem1", "base": str(base),
             "set": {"cem": {"lambda": 1.0}}, "grid": {"defenses.0.ratio": [0.4]},
             "seeds": {"min": 1, "max": 5, "until": "decided"}}]
    spec = {"name": "sim", "base": str(folder / "noise.yaml"), "seeds": 1,
            "variants": variants}
    return spec if per_round is None else {**spec, "per_round": per_round}


def _metrics(cfg: RunConfig, gains: list[float], study: int) -> tuple[float, float]:
    """(accuracy, worst-case MSE): noise on a line from (0.80, 0.010) to (0.60, 0.030);
    top-k over ratio 0.5 / 0.4 / 0.3 at 0.80 / 0.75 / 0.70 with 1.2x noise's MSE; its CEM
    setting at 0.75 with the defense's true gain; a seed effect every cell of a seed shares,
    8% noise per run."""
    sigma = float(cfg.defenses[-1]["sigma"])
    ratio = float(cfg.defenses[0].get("ratio", 0.0))
    i = round(100 * (sigma - 0.1)) if ratio else -1
    rng = np.random.default_rng([study, cfg.seed, round(100 * sigma), round(100 * ratio),
                                 int(cfg.cem is not None)])
    effect = 0.3 * math.sin(1.7 * cfg.seed + study)
    if ratio:
        acc = 0.55 + 0.5 * ratio
        mse = 1.2 * (0.09 - 0.1 * acc) * (1 + (gains[i] if cfg.cem is not None else 0.0))
    else:
        acc, mse = 0.9 - sigma, 0.1 * sigma
    return acc + 0.002 * rng.normal(), mse * math.exp(effect + 0.08 * rng.normal())


def _finish(t: Trial, out: Path, gains: list[float], study: int) -> None:
    """Write ``t``'s finished run record with its synthetic metrics."""
    cfg = t.cfg
    rec = RunRecord.begin_training(out / t.name, cfg, resume=False, device="cpu")
    acc, mse = _metrics(cfg, gains, study)
    rec = rec.finish_training({**rec.metrics, "train": {"epochs": 1, "test_accuracy": acc,
                                                        "seconds": 1.0}})
    rec.record_attacks({"attacks": {"decoder": {"metrics": {"mse": mse}}},
                        "worst": {"mse": {"value": mse, "attack": "decoder"}},
                        "seconds": 1.0}, cfg, device="cpu")


def _decided(trials: list[Trial], out: Path, per_round: int | None) -> int:
    """CEM settings the planner reads decided from the runs finished in ``out``."""
    _, notes = plan_round(trials, out, per_round=per_round)
    return sum(n.endswith("): decided") for n in notes)


def study(gains: list[float], index: int, per_round: int | None, budgets: list[float],
          slots: int, folder: Path) -> dict[str, float]:
    """One simulated sweep; decided settings at each budget and at its end."""
    spec = load_sweep(_spec(folder, gains, per_round))
    trials = expand(spec)
    out = folder / "out"
    for t in trials:  # the first seed everywhere: the same for every per_round
        _finish(t, out, gains, index)
    rng = np.random.default_rng([index, 7])
    now = 0.0
    ends: dict[str, float] = {}
    cuts: dict[float, int] = {}
    planned: list[Trial] = list(trials)  # the sweep's trials so far (run_until_decided's)

    def run(ts: list[Trial], refill: Callable[[], list[Trial]] | None) -> GridResult:
        nonlocal planned
        planned = ts  # the list run_until_decided extends as it plans

        def submit(job: Job) -> str:
            ends[job[0].name] = now + float(rng.uniform(0.8, 1.2))
            return job[0].name

        def wait_one(running: list[str]) -> str:
            nonlocal now
            first = min(running, key=ends.__getitem__)
            for b in budgets:  # a session stopping at b: what is decided by then
                if b not in cuts and now <= b < ends[first]:
                    cuts[b] = _decided(ts, out, per_round)
            now = ends[first]
            _finish(next(t for t in ts if t.name == first), out, gains, index)
            return first

        def more() -> list[Job]:
            return [(t, out / t.name, {}) for t in (refill() if refill else [])]

        pending: list[Job] = [(t, out / t.name, {}) for t in ts
                              if not RunRecord.load(out / t.name).finished(t.cfg, device="cpu")]
        schedule(pending, slots, submit, wait_one, more)
        return GridResult(out)

    run_until_decided(trials, out, run, device="cpu", per_round=per_round)
    end = _decided(planned, out, per_round)
    return {**{f"decided_at{b:g}": float(cuts.get(b, end)) for b in budgets},
            "decided_end": float(end), "trials_end": float(len(ends)), "time_end": now}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--studies", type=int, default=20)
    ap.add_argument("--per-round", type=int, nargs="+", default=[0, 4, 1],
                    help="values of per_round to compare (0: no cap)")
    ap.add_argument("--defenses", type=int, default=6)
    ap.add_argument("--slots", type=int, default=2)
    ap.add_argument("--budgets", type=float, nargs="+", default=[4.0, 8.0, 12.0, 16.0, 20.0])
    a = ap.parse_args()
    gains = [0.4 * i / max(1, a.defenses - 1) for i in range(a.defenses)]
    t0 = time.perf_counter()
    out: dict[str, float] = {}
    for p in a.per_round:
        rows = []
        for i in range(a.studies):
            with tempfile.TemporaryDirectory() as d:
                rows.append(study(gains, i, p or None, a.budgets, a.slots, Path(d)))
        means = {k: statistics.fmean(r[k] for r in rows) for k in rows[0]}
        print(f"per_round {p or 'none'}: " + ", ".join(f"{k} {v:.2f}" for k, v in
                                                      means.items()), flush=True)
        out |= {f"per_round{p}_{k}": round(v, 3) for k, v in means.items()}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
