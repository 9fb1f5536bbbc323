"""Constrained TPE against multi-objective TPE on a response surface with a binding budget:
which finds the better setting in the same number of trials? (issue 20 item 2)

``benchmarks/tune_search.py`` compares the two modes on real tiny trials, which can afford
a few searches of a few trials each and a budget that every trial met. This benchmark asks
the same question with the statistical power that real trials cannot buy: the tuner's own
:class:`~splitcem.study.tune_search.Searcher` (Ray Tune's OptunaSearch over Optuna's TPE, in
either mode) searches the default noise / noise + CEM space of the CIFAR-10 CPU protocol, but
each trial's accuracy and worst-case MSE come from a **response surface** instead of a
training run:

    accuracy  = a0 + a1 * sigma + a2 * lambda                          (+ seed noise)
    log(MSE)  = b0 + b1 * log(sigma) + b2 * log(1 + lambda)             (+ seed noise)

fitted by least squares to the finished runs under ``--runs`` (default: results/cifar10_cpu,
read through the run record), with the seed noise's sd taken from the spread of those runs'
seeds. The budget is the surface's accuracy at the space's smallest sigma without CEM minus
``--max-drop`` points, so most of the space is infeasible and the best setting lies on the
budget's edge. Each mode runs ``--searches`` searches (searcher seeds 0, 1, ...) of
``--trials`` trials; a search recommends what the tuner recommends (the trial with the
highest MSE among those whose *observed* accuracy met the budget) and is scored by the
surface's noise-free MSE there and whether it truly meets the budget. The same searcher seed
sees the same noise draws in both modes (common random numbers), so the modes pair by seed.

    python benchmarks/tune_modes.py [--searches 100] [--trials 20] [--max-drop 1.0]

It measures the searchers on a model of the protocol, not the protocol: the surface is a
smooth fit to a handful of settings. Last line: one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np

REPO = Path(__file__).resolve().parents[1]
BASE = REPO / "splitcem" / "configs" / "cpu" / "cifar10_noise.yaml"
SPACE = {"families": {
    "noise": {"set": {"defenses": [{"name": "noise", "sigma": 0.1}],
                      "defenses.0.sigma": {"low": 0.01, "high": 1.0, "log": True},
                      "cem.lambda": 0.0}},
    "cem": {"set": {"defenses": [{"name": "noise", "sigma": 0.1}],
                    "defenses.0.sigma": {"low": 0.01, "high": 1.0, "log": True},
                    "cem.lambda": {"low": 0.3, "high": 100.0, "log": True}}}}}


def fit_surface(runs: Path) -> dict[str, Any]:
    """Least-squares fits of accuracy (points) and log MSE to the finished noise / noise +
    CEM runs under ``runs``; seed noise from the within-setting spread."""
    from splitcem.record import RunRecord
    from splitcem.report import attack_metric

    rows = []
    for rec in RunRecord.find([runs]):
        cfg = rec.config
        if not rec.finished() or cfg is None or [d["name"] for d in cfg.defenses] != ["noise"]:
            continue
        sigma = float(cfg.defenses[0]["sigma"])
        lam = cfg.cem.lam if cfg.cem is not None else 0.0
        mse = attack_metric(rec.metrics, "mse")
        if math.isfinite(mse) and rec.accuracy is not None:
            rows.append((sigma, lam, 100 * rec.accuracy, math.log(mse)))
    if len(rows) < 4:
        raise SystemExit(f"{runs}: {len(rows)} finished noise runs; the fit needs 4 or more")
    r = np.array(rows)
    sig, lam, acc, lmse = r.T
    a, *_ = np.linalg.lstsq(np.c_[np.ones_like(sig), sig, lam], acc, rcond=None)
    b, *_ = np.linalg.lstsq(np.c_[np.ones_like(sig), np.log(sig), np.log1p(lam)], lmse,
                            rcond=None)
    groups: dict[tuple[float, float], list[tuple[float, float]]] = {}
    for s, la, ac, lm in rows:
        groups.setdefault((s, la), []).append((ac, lm))
    within = [np.var(np.array(g), axis=0, ddof=1) for g in groups.values() if len(g) > 1]
    sd = np.sqrt(np.mean(within, axis=0)) if within else np.array([0.4, 0.04])
    return {"a": a.tolist(), "b": b.tolist(), "sd_acc": float(sd[0]),
            "sd_log_mse": float(sd[1]), "runs": len(rows), "settings": len(groups)}


def truth(surface: dict[str, Any], sigma: float, lam: float) -> tuple[float, float]:
    """Noise-free (accuracy in points, MSE) of the surface."""
    a, b = surface["a"], surface["b"]
    acc = a[0] + a[1] * sigma + a[2] * lam
    return acc, math.exp(b[0] + b[1] * math.log(sigma) + b[2] * math.log1p(lam))


def best_feasible(surface: dict[str, Any], budget: float) -> tuple[float, float, float]:
    """(MSE, sigma, lambda) of the best truly feasible point on a fine log grid."""
    best = (0.0, 0.0, 0.0)
    for s in np.geomspace(0.01, 1.0, 400):
        for la in np.r_[0.0, np.geomspace(0.3, 100.0, 400)]:
            acc, mse = truth(surface, float(s), float(la))
            if acc >= budget and mse > best[0]:
                best = (mse, float(s), float(la))
    return best


def search(space: Any, surface: dict[str, Any], budget: float, mode: str, seed: int,
           trials: int) -> dict[str, Any]:
    """One search; the recommendation scored on the noise-free surface."""
    from splitcem.study.tune_search import Searcher

    searcher = Searcher(space, budget, mode=mode, seed=seed)
    noise = np.random.default_rng(10_000 + seed)  # the same draws, trial by trial, per mode
    seen = []
    for _ in range(trials):
        tid, family, vals = searcher.ask()
        sigma = float(vals["defenses.0.sigma"])
        lam = float(vals.get("cem.lambda", 0.0)) if family == "cem" else 0.0
        acc, mse = truth(surface, sigma, lam)
        e_acc, e_mse = noise.normal(size=2)
        obs_acc = acc + surface["sd_acc"] * e_acc
        obs_mse = mse * math.exp(surface["sd_log_mse"] * e_mse)
        searcher.tell(tid, obs_acc / 100, obs_mse)
        seen.append((obs_acc >= budget, obs_mse, mse, acc >= budget, sigma, lam))
    feasible = [s for s in seen if s[0]]
    if not feasible:
        return {"found": False, "true_mse": 0.0, "truly_feasible": False, "feasible_trials": 0}
    rec = max(feasible, key=lambda s: s[1])
    return {"found": True, "true_mse": rec[2], "truly_feasible": rec[3],
            "feasible_trials": len(feasible), "sigma": rec[4], "lambda": rec[5]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=Path, default=REPO / "results" / "cifar10_cpu")
    ap.add_argument("--searches", type=int, default=100)
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--max-drop", type=float, default=1.0)
    a = ap.parse_args()
    import yaml
    from scipy import stats

    from splitcem.study.space import parse_space

    t0 = time.perf_counter()
    surface = fit_surface(a.runs)
    budget = truth(surface, 0.01, 0.0)[0] - a.max_drop
    best = best_feasible(surface, budget)
    print(f"surface from {surface['runs']} runs ({surface['settings']} settings): accuracy "
          f"{surface['a']}, log MSE {surface['b']}, seed sd {surface['sd_acc']:.2f} points / "
          f"{surface['sd_log_mse']:.3f} log MSE; budget {budget:.2f}%; best truly feasible "
          f"MSE {best[0]:.5f} at sigma {best[1]:.3f}, lambda {best[2]:.2f}", flush=True)
    space = parse_space(SPACE, yaml.safe_load(BASE.read_text()))
    res = {m: [search(space, surface, budget, m, s, a.trials) for s in range(a.searches)]
           for m in ("constrained", "multi")}
    figures: dict[str, Any] = {"searches": a.searches, "trials_per_search": a.trials,
                               "budget_pct": round(budget, 3), "best_true_mse": best[0],
                               "surface": surface}
    for m, rs in res.items():
        # a recommendation that is not truly feasible scores 0: it breaks the budget
        score = np.array([r["true_mse"] if r["truly_feasible"] else 0.0 for r in rs])
        figures[m] = {
            "mean_true_mse_of_recommendation": float(score.mean()),
            "share_of_best": float(score.mean() / best[0]),
            "recommendation_breaks_budget": int(sum(r["found"] and not r["truly_feasible"]
                                                    for r in rs)),
            "no_feasible_trial": int(sum(not r["found"] for r in rs)),
            "mean_feasible_trials": float(np.mean([r["feasible_trials"] for r in rs]))}
        print(f"{m}: recommendation's true MSE {score.mean():.5f} on average "
              f"({100 * score.mean() / best[0]:.1f}% of the best feasible), "
              f"{figures[m]['recommendation_breaks_budget']} of {a.searches} break the budget, "
              f"{figures[m]['no_feasible_trial']} found nothing feasible, "
              f"{figures[m]['mean_feasible_trials']:.1f} feasible trials per search", flush=True)
    d = np.array([(c["true_mse"] if c["truly_feasible"] else 0.0)
                  - (m["true_mse"] if m["truly_feasible"] else 0.0)
                  for c, m in zip(res["constrained"], res["multi"], strict=True)])
    half = float(stats.t.ppf(0.975, len(d) - 1) * d.std(ddof=1) / math.sqrt(len(d)))
    figures["constrained_minus_multi"] = {"mean": float(d.mean()), "ci95": [
        float(d.mean() - half), float(d.mean() + half)], "constrained_better": int((d > 0).sum()),
        "multi_better": int((d < 0).sum()), "ties": int((d == 0).sum())}
    print(f"constrained - multi (paired by searcher seed): {d.mean():+.5f} "
          f"[{d.mean() - half:+.5f}, {d.mean() + half:+.5f}] (95% t interval); constrained "
          f"better in {(d > 0).sum()}, multi in {(d < 0).sum()}, ties {(d == 0).sum()}")
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
