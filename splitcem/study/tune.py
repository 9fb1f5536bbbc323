"""The privacy budget tuner: the least leaky setting within an accuracy budget, on Ray Tune.

``run_tune(BASE, max_drop=1.0)`` searches a :class:`~splitcem.study.space.SearchSpace`
(default: noise sigma alone, noise sigma with CEM lambda, each zoo defense of the base by its
strength) with Ray Tune's OptunaSearch (:mod:`splitcem.study.tune_search`) for the setting
with the highest worst-case attack MSE among those whose test accuracy is at least the
budget: the reference accuracy (``reference`` runs' mean; default the undefended base,
trained here with the base's seed) minus ``max_drop`` points.

It is another front door to the sweep engine: every trial is
:func:`splitcem.study.execute.run_trial` (on Ray workers, results shipped back and
:func:`~splitcem.study.execute.land` ed), a run directory under ``OUT/trials`` read only
through :class:`splitcem.record.RunRecord`. ``tune_state.json`` lists every trial asked and
its fate, written as each one ends: ``resume`` observes the finished and stopped ones again
(never re-run) and re-submits those in flight (each resumes from its last epoch checkpoint),
so a kill loses at most the epochs under way. ``warm_start`` folders: finished runs that lie
in the space (and match the base otherwise, hashes compared) are adopted as observations.
Trials that cannot reach the budget are stopped after an epoch by a rule learned from the
finished runs' histories, the reference runs' included (:mod:`splitcem.study.stopping`).

``confirm_seeds`` N: the recommended setting and the noise-only settings around its accuracy
run again with more seeds, one at a time, until the gain's verdict is decided or N seeds
ran (:func:`splitcem.study.frontier.compare`). Output: :mod:`splitcem.study.tune_report`.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitcem._io import read_json_object, write_json
from splitcem.config import RunConfig, load_config
from splitcem.errors import ConfigError
from splitcem.record import RunRecord
from splitcem.report import attack_metric
from splitcem.runid import attack_hash
from splitcem.study.execute import land, run_trial
from splitcem.study.grid import Trial
from splitcem.study.space import SearchSpace, default_space, load_space
from splitcem.study.stopping import StopRule, learn_rule
from splitcem.study.trials import Engine, plan_trials, run_trials

__all__ = ["Observation", "TuneResult", "run_tune"]

log = logging.getLogger(__name__)

STATE_FILE = "tune_state.json"
TRIALS = "trials"


@dataclass
class Observation:
    """One trial's result: its family, values, seed and what it measured."""

    name: str
    family: str
    values: dict[str, Any]
    seed: int
    status: str  # finished | stopped | failed
    accuracy: float = float("nan")
    mse: float = float("nan")
    ssim: float = float("nan")
    psnr: float = float("nan")
    source: str = "tune"  # tune | warm-start | confirm
    run_dir: str = ""

    def feasible(self, budget: float) -> bool:
        return self.status == "finished" and self.accuracy >= budget


@dataclass
class TuneResult:
    """What a tune did: its folder, budget, every observation, and what this call paid for."""

    out: Path
    budget: float
    reference_accuracy: float
    observations: list[Observation] = field(default_factory=list)
    ran: list[str] = field(default_factory=list)
    rule: StopRule | None = None
    report: dict[str, Any] = field(default_factory=dict)
    #: how many times ``--confirm-seeds`` may judge the recommendation (1: no confirmation);
    #: its verdict is at :func:`~splitcem.study.frontier_plan.sequential_level` of it
    looks: int = 1


def _observation(rec: RunRecord, family: str, values: dict[str, Any], source: str,
                 status: dict[str, Any] | None = None) -> Observation:
    st = (status or rec.trial or {}).get("status", "finished")
    cfg = rec.config
    seed = cfg.seed if cfg is not None else int((status or {}).get("seed", 0))
    if st == "finished" and rec.finished():
        m = rec.metrics
        return Observation(rec.path.name, family, values, seed, "finished", rec.accuracy,
                           attack_metric(m, "mse"), attack_metric(m, "ssim"),
                           attack_metric(m, "psnr"), source, str(rec.path))
    acc = float((status or rec.trial).get("accuracy") or float("nan"))
    return Observation(rec.path.name, family, values, seed,
                       "stopped" if st == "stopped" else "failed", acc, source=source,
                       run_dir=str(rec.path))


def _reference(base: RunConfig, reference: Sequence[str | Path], out: Path, *,
               warm: Sequence[str | Path], address: str | None, device: str | None,
               threads: int = 1) -> tuple[float, list[dict[str, Any]]]:
    """The reference accuracy and the reference runs' records (they teach the stop rule)."""
    if reference:
        recs = [r for r in RunRecord.find(reference) if r.finished()]
        if not recs:
            raise ConfigError(f"--reference {' '.join(map(str, reference))}: no finished run "
                              "there; train one (splitcem run CONFIG) or leave it out")
        return float(sum(r.accuracy for r in recs) / len(recs)), [r.metrics for r in recs]
    raw = {**base.to_dict(), "defenses": [], "cem": None, "name": f"undefended_s{base.seed}"}
    cfg = load_config(raw)
    trial = Trial(cfg.name, cfg, cfg.seed, {}, "reference")
    res = run_trials([trial], out / "reference", name="reference",
                     engine=Engine(address=address, threads_per_trial=threads,
                                   adopt=tuple(map(Path, warm)), device=device, progress=False))
    rec = RunRecord.load(out / "reference" / cfg.name)
    if not rec.finished(cfg, device=device):
        raise ConfigError(f"the undefended reference run failed: "
                          f"{res.statuses.get(cfg.name, {}).get('error')}; see {rec.path}")
    return rec.accuracy, [rec.metrics]


def _warm_start(space: SearchSpace, base: dict[str, Any], dirs: Sequence[str | Path],
                tdir: Path, device: str | None) -> list[Observation]:
    obs = []
    for rec in RunRecord.find(dirs):
        if rec.config is None or not rec.finished():
            continue
        at = space.point_of(rec.config)
        if at is None:
            continue
        fam, vals = at
        name = f"{space.label(fam, vals)}_s{rec.config.seed}"
        cfg = space.config(base, fam, vals, name=name, seed=rec.config.seed)
        if not rec.finished(cfg, device=device):
            continue  # in the space, but another run than the base would make
        _, jobs = plan_trials([Trial(name, cfg, cfg.seed, vals, fam)], tdir,
                              adopt=[rec.path], device=device)
        if not jobs:
            obs.append(_observation(RunRecord.load(tdir / name), fam, vals, "warm-start"))
    return obs


def run_tune(
    base: str | Path,
    *,
    max_drop: float = 1.0,
    reference: Sequence[str | Path] = (),
    space: str | Path | SearchSpace | None = None,
    trials: int = 20,
    max_concurrent: int | None = None,
    address: str | None = None,
    warm_start: Sequence[str | Path] = (),
    confirm_seeds: int = 0,
    out: str | Path = "runs/tune",
    resume: bool = False,
    mode: str = "constrained",
    threads_per_trial: int = 1,
    device: str | None = None,
    seed: int = 0,
    cut: list[int] | None = None,
) -> TuneResult:
    """Search for the least leaky setting within ``max_drop`` accuracy points of the
    reference; write ``tune.md`` / ``tune.json`` / ``tune.png`` into ``out``.

    Args:
        base: The base config (what every trial shares).
        max_drop: Accuracy points (percent) the defense may cost.
        reference: Finished runs whose mean accuracy is the reference.
        space: A space file (:mod:`splitcem.study.space`) or object; default per family.
        trials: Trials to pay for (warm-start and earlier finished ones are free).
        max_concurrent: Trials at once (default: CPUs // threads_per_trial).
        address: A Ray cluster; default a local Ray sized to this machine.
        warm_start: Folders of finished runs to adopt as observations.
        confirm_seeds: Seeds (in all) to confirm the recommendation with; 0: none.
        out: The tune's folder.
        resume: Continue a killed tune in ``out``.
        mode: ``constrained`` (TPE with the budget as a constraint) or ``multi``.
        seed: The searcher's seed (trials use the base config's seed).
        cut: Also search ``model.cut`` over these (default space only).
    """
    from splitcem.study import tune_report
    from splitcem.study.trials import _ray
    from splitcem.study.tune_search import Searcher

    if trials < 0 or max_drop < 0 or confirm_seeds < 0:
        raise ConfigError("--trials, --max-drop and --confirm-seeds must be >= 0")
    out_dir, base_cfg = Path(out), load_config(base)
    base_raw = base_cfg.to_dict()
    state_path = out_dir / STATE_FILE
    old = read_json_object(state_path)
    if old and not resume:
        raise ConfigError(f"{out_dir} holds a tune already: add --resume to continue it, or "
                          "give a new --out")
    same = {"base_hash": attack_hash(base_cfg, device=device), "max_drop": max_drop,
            "mode": mode, "seed": seed}
    if old:
        changed = [k for k, v in same.items() if k in old and old[k] != v]
        if changed:
            raise ConfigError(
                f"{out_dir} holds a tune of another {', '.join(changed)} (base config, "
                "--max-drop, --mode, --seed): resume it with what it was started with, or "
                "give a new --out")
    sp = space if isinstance(space, SearchSpace) else (
        load_space(space, base_raw) if space is not None else default_space(base_raw, cut=cut))
    out_dir.mkdir(parents=True, exist_ok=True)
    tdir = out_dir / TRIALS
    ray, started = _ray(address, None, None)
    try:
        ref, ref_runs = _reference(base_cfg, reference, out_dir, warm=warm_start, address=address,
                                   device=device, threads=threads_per_trial)
        budget = ref - max_drop / 100
        if old and "budget" in old and abs(float(old["budget"]) - budget) > 1e-9:
            raise ConfigError(f"{out_dir} was tuned against a reference accuracy of "
                              f"{old['reference']:.4f}, these --reference runs give {ref:.4f}: "
                              "resume with the same reference runs, or give a new --out")
        log.info("tune: reference accuracy %.4f, budget %.4f", ref, budget)
        result = TuneResult(out_dir, budget, ref)
        obs = _warm_start(sp, base_raw, warm_start, tdir, device) if warm_start else []
        asked: dict[str, dict[str, Any]] = dict((old or {}).get("trials", {}))
        in_flight = []
        for name, t in asked.items():
            rec = RunRecord.load(tdir / name)
            cfg = sp.config(base_raw, t["family"], t["values"], name=name, seed=t["seed"])
            if rec.finished(cfg, device=device) or rec.trial.get("status") in ("stopped",
                                                                               "failed"):
                obs.append(_observation(rec, t["family"], t["values"], "tune"))
            else:
                in_flight.append((name, t))
        searcher = Searcher(sp, budget, mode=mode, seed=seed)
        for o in obs:
            if o.status != "failed":
                searcher.observe(o.family, o.values, o.accuracy,
                                 o.mse if o.status == "finished" else None)
        result.observations = obs

        def save_state() -> None:
            write_json(state_path, {"base": str(base), "budget": budget, "reference": ref,
                                    **same, "trials": asked})

        def rule() -> StopRule:
            runs = ref_runs + [RunRecord.load(o.run_dir).metrics for o in result.observations
                               if o.status == "finished"]
            r = learn_rule(runs, budget=budget, epochs=base_cfg.train.epochs)
            assert not r.check(runs), r.check(runs)  # never stops a feasible run it saw
            return r

        paid = sum(1 for t in asked.values() if t.get("paid", True))
        cpus = int(ray.cluster_resources().get("CPU", 1))
        limit = max_concurrent or max(1, cpus // threads_per_trial)
        remote = ray.remote(num_cpus=threads_per_trial, max_retries=0)(run_trial)
        running: dict[Any, tuple[str, str | None]] = {}
        tries = 0
        while in_flight or running or (paid < trials and tries < 5 * trials + 10):
            while len(running) < limit and (in_flight or (paid < trials
                                                          and tries < 5 * trials + 10)):
                tid: str | None = None
                if in_flight:
                    name, t = in_flight.pop(0)
                else:
                    tries += 1
                    tid, fam, vals = searcher.ask()
                    name = f"{sp.label(fam, vals)}_s{base_cfg.seed}"
                    t = {"family": fam, "values": vals, "seed": base_cfg.seed}
                    done = [o for o in result.observations if o.name == name]
                    if done:  # asked again (rounded to a point already run): not paid twice
                        searcher.tell(tid, done[0].accuracy, done[0].mse)
                        continue
                    asked[name] = {**t, "paid": True}
                    paid += 1
                    save_state()
                cfg = sp.config(base_raw, t["family"], t["values"], name=name, seed=t["seed"])
                meta = {"name": name, "variant": t["family"], "values": t["values"],
                        "seed": t["seed"]}
                ref_ = remote.remote(cfg.to_dict(), str(tdir / name), threads=threads_per_trial,
                                     meta=meta, device=device, ship=True,
                                     stop_rule=rule().to_dict())
                running[ref_] = (name, tid)
                log.info("tune: trial %s started (%d of %d paid)", name, paid, trials)
            if not running:
                break
            ready, _ = ray.wait(list(running), num_returns=1)
            for r in ready:
                name, tid = running.pop(r)
                try:
                    status = ray.get(r)
                except Exception as e:  # the worker died
                    status = {"name": name, "status": "failed", "error": f"{e}"}
                status = land(tdir / name, status)
                t = asked[name]
                o = _observation(RunRecord.load(tdir / name), t["family"], t["values"], "tune",
                                 status)
                result.observations.append(o)
                result.ran.append(name)
                mse = o.mse if o.status == "finished" else None
                if tid is not None:
                    searcher.tell(tid, None if o.status == "failed" else o.accuracy, mse)
                elif o.status != "failed":  # re-submitted after a kill: not asked here
                    searcher.observe(o.family, o.values, o.accuracy, mse)
                log.info("tune: trial %s %s: accuracy %.4f, worst-case MSE %.4f", name,
                         o.status, o.accuracy, o.mse)
        result.rule = rule()
        if confirm_seeds > 1:
            from splitcem.study.tune_confirm import confirm

            confirm(result, sp, base_raw, confirm_seeds,
                    engine=Engine(address=address, max_concurrent=max_concurrent,
                                  threads_per_trial=threads_per_trial,
                                  adopt=tuple(map(Path, warm_start)), device=device,
                                  progress=False))
    finally:
        if started:
            ray.shutdown()
    result.report = tune_report.write(result, sp, mode=mode)
    return result
