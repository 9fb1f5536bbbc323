"""A short probe of the zoo's strengths: accuracy per defense and strength, beside noise alone.

The bundled CPU sweep (``configs/sweeps/cifar10_cpu.yaml``) wants each zoo defense at three
strengths whose accuracies fall inside the noise-only curve's range (about 75% to 80% on the
full CPU protocol). This trains every trial of the sweep *without CEM* (the zoo's curves,
noise alone over sigma and the cut baseline left out unless ``--with-noise``) on a shortened
protocol: ``--epochs`` epochs on ``--limit-train`` training images, no attacks; schedule
parameters that count epochs are scaled with it (PATROL's ``prune_epoch``, adversarial
training's ``pretrain_epochs``). It reports each defense's accuracy per strength and, with
``--with-noise`` (the default), where that falls against noise alone trained the same way:
a short run's accuracies are lower than a full run's, so the comparison that carries over is
the position against the noise curve, not the figure itself.

With ``--cem 1 3 10`` it also trains each defense at the strength its CEM trials use, with CEM
at each of those lambdas, and says where each lands against that defense's own curve (its
three strengths without CEM, trained the same way): the matched comparison of the sweep
needs its CEM points inside that range, so these are the lambdas to choose from (no attack
runs, so this chooses by accuracy only; the gain is what the sweep measures).

The trials run through the one engine (:func:`splitcem.study.trials.run_trials`, in this
process, one after another) into ``--out``, so a killed probe continues where it stopped.

Usage::

    python benchmarks/zoo_probe.py                      # 3 epochs on 10,000 images
    python benchmarks/zoo_probe.py --only topk --only ldp
    python benchmarks/zoo_probe.py --quick              # tiny: proves it works
    python benchmarks/zoo_probe.py --no-noise --cem 1 3 10   # CEM lambdas per defense

The last stdout line is one JSON object: ``{"epochs": E, "limit_train": N, "accuracy_pct":
{defense: {strength: accuracy %}}, "noise_accuracy_pct": {sigma: accuracy %},
"cem_accuracy_pct": {defense: {lambda: accuracy %}}, "seconds": wall seconds}``.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from splitcem.config import load_config, set_path
from splitcem.record import RunRecord
from splitcem.study.grid import Trial, add_overrides, expand, format_value, load_sweep
from splitcem.study.paper import cem_lambda, defense_of
from splitcem.study.reproduce import sweep_file
from splitcem.study.trials import Engine, run_trials

#: epoch-counting defense parameters, rescaled to the probe's epochs (name -> key)
_EPOCH_KEYS = {"patrol": "prune_epoch", "adversarial": "pretrain_epochs"}


def shorten(trial: Trial, epochs: int) -> Trial:
    """The trial trained for ``epochs`` epochs, its defenses' epoch-counting parameters
    scaled from its configured epochs (PATROL prunes at least once, at epoch >= 1) and the
    warm-up kept below the epochs."""
    d = trial.cfg.to_dict()
    full = int(trial.cfg.train.epochs)
    for i, spec in enumerate(d.get("defenses") or []):
        key = _EPOCH_KEYS.get(spec["name"])
        if key is None or key not in spec:
            continue
        lo = 1 if key == "prune_epoch" else 0
        set_path(d, f"defenses.{i}.{key}", max(lo, min(epochs, round(spec[key] * epochs / full))))
    set_path(d, "train.epochs", epochs)
    set_path(d, "train.warmup_epochs", min(trial.cfg.train.warmup_epochs, epochs - 1))
    set_path(d, "train.eval_every", epochs)
    return Trial(trial.name, load_config(d), trial.seed, trial.values, trial.variant)


def probe_trials(epochs: int, limit_train: int, limit_test: int | None, *,
                 only: list[str], with_noise: bool,
                 cem: Sequence[float] = ()) -> list[Trial]:
    """The bundled CPU sweep's trials without CEM (zoo; noise too with ``with_noise``),
    seed 125 only, shortened; with ``cem``, each defense's CEM setting (its strength from the
    sweep) at each of those lambdas too, named ``{defense}{strength}_probe_cem{lambda}``."""
    spec = load_sweep(sweep_file("cifar10", "cpu"))
    ov = [f"data.limit_train={limit_train}", "attack.attacks=[]", "attack.leakage=false"]
    if limit_test is not None:
        ov.append(f"data.limit_test={limit_test}")
    add_overrides(spec, ov)
    out: list[Trial] = []
    templates: dict[str, Trial] = {}
    for t in expand(spec):
        name = defense_of(t.cfg)[0]
        lam = cem_lambda(t.cfg)
        if t.seed != 125 or name == "cut" or (name == "noise" and not with_noise):
            continue
        if only and name not in only and name != "noise":
            continue
        if lam > 0:
            if name != "noise":
                templates.setdefault(name, t)
            continue
        out.append(shorten(t, epochs))
    for name, t in templates.items():
        for lam in cem:
            d = t.cfg.to_dict()
            set_path(d, "cem.lambda", float(lam))
            tag = f"{name}{format_value(defense_of(t.cfg)[2])}_probe_cem{format_value(lam)}"
            set_path(d, "name", tag)
            out.append(shorten(Trial(tag, load_config(d), t.seed, {**t.values,
                                                                   "cem.lambda": lam}), epochs))
    return out


def _where(a: float, curve: dict[str, float], whose: str) -> str:
    """Where accuracy ``a`` falls against a curve's range, as a bracketed remark."""
    if not curve:
        return ""
    lo, hi = min(curve.values()), max(curve.values())
    where = "inside" if lo <= a <= hi else "below" if a < lo else "above"
    return f"  ({where} {whose} {lo:.2f}-{hi:.2f}%)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--limit-train", type=int, default=10_000)
    ap.add_argument("--limit-test", type=int, default=None)
    ap.add_argument("--only", action="append", default=[], help="a defense (repeatable)")
    ap.add_argument("--no-noise", action="store_true", help="leave out noise alone")
    ap.add_argument("--cem", type=float, nargs="*", default=[], metavar="LAMBDA",
                    help="also each defense's CEM setting at these lambdas")
    ap.add_argument("--out", type=Path, default=Path("runs/zoo_probe"))
    ap.add_argument("--threads", type=int, default=1, help="torch threads per trial")
    ap.add_argument("--quick", action="store_true",
                    help="2 epochs on 256 images, 200 test images, topk and ldp only")
    args = ap.parse_args()
    if args.quick:
        args.epochs, args.limit_train, args.limit_test = 2, 256, 200
        args.only = args.only or ["topk", "ldp"]
    trials = probe_trials(args.epochs, args.limit_train, args.limit_test, only=args.only,
                          with_noise=not args.no_noise, cem=args.cem)
    print(f"probe: {len(trials)} trials, {args.epochs} epoch(s) on {args.limit_train} images "
          f"-> {args.out}", flush=True)
    t0 = time.perf_counter()
    res = run_trials(trials, args.out, name="zoo_probe",
                     engine=Engine(use_ray=False, threads_per_trial=args.threads))
    seconds = time.perf_counter() - t0
    acc: dict[str, dict[str, float]] = defaultdict(dict)
    cem_acc: dict[str, dict[str, float]] = defaultdict(dict)
    for t in trials:
        rec = RunRecord.load(args.out / t.name)
        name, _, val = defense_of(t.cfg)
        a = rec.accuracy if rec.status in ("trained", "attacked") else math.nan
        lam = cem_lambda(t.cfg)
        if lam > 0:
            cem_acc[name][format_value(lam)] = round(100 * a, 2)
        else:
            acc[name][format_value(val)] = round(100 * a, 2)
    noise = acc.pop("noise", {})
    for name, per in acc.items():
        for s, a in per.items():
            print(f"{name:>12} {s:>8}: {a:6.2f}%" + _where(a, noise, "noise's"))
    for s, a in noise.items():
        print(f"{'noise':>12} {s:>8}: {a:6.2f}%")
    for name, per in cem_acc.items():
        for s, a in per.items():
            print(f"{name:>12} cem {s:>4}: {a:6.2f}%" + _where(a, acc.get(name, {}), "its own"))
    if res.failed:
        print("failed: " + ", ".join(res.failed))
    figures: dict[str, Any] = {"epochs": args.epochs, "limit_train": args.limit_train,
                               "accuracy_pct": acc, "noise_accuracy_pct": noise,
                               "cem_accuracy_pct": cem_acc, "failed": res.failed,
                               "seconds": round(seconds, 1)}
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
