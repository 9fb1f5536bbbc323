"""Constrained TPE against multi-objective TPE read at the budget: which finds the better
setting in the same number of trials? On tiny real data (Fashion-MNIST subsets).

    python benchmarks/tune_search.py [--trials 6] [--seeds 0 1] [--out runs/bench/tune_search]

Each mode runs ``--trials`` real trials per searcher seed from the same reference run (the
undefended base, trained once) and the default space; the figure is the best worst-case MSE
among trials within the budget (higher is better) and how many trials were feasible. The
last line of output is one JSON object of the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import yaml

BASE = {"name": "tiny", "seed": 0, "device": "cpu",
        "data": {"name": "fashion_mnist", "limit_train": 1024, "limit_test": 1024},
        "model": {"client_width": 0.125, "server_width": 0.125},
        "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "warmup_epochs": 0,
                  "milestones": [2]},
        "attack": {"attacks": [{"name": "decoder", "epochs": 3, "width": 16, "depth": 1}]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trials", type=int, default=6)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--max-drop", type=float, default=3.0)
    ap.add_argument("--max-concurrent", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("runs/bench/tune_search"))
    a = ap.parse_args()
    from splitcem.study.trials import LOOPBACK_ENV

    for k, v in LOOPBACK_ENV.items():
        os.environ.setdefault(k, v)
    from splitcem.study.tune import run_tune

    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "base.yaml").write_text(yaml.safe_dump(BASE))
    ref_out = a.out / "reference_tune"
    if not (ref_out / "tune.json").is_file():  # the reference, trained once for all
        run_tune(a.out / "base.yaml", max_drop=a.max_drop, trials=0, out=ref_out)
    figures: dict[str, object] = {"trials_per_search": a.trials, "searcher_seeds": a.seeds}
    t0 = time.perf_counter()
    for mode in ("constrained", "multi"):
        best, feasible = [], []
        for seed in a.seeds:
            out = a.out / f"{mode}_s{seed}"
            res = run_tune(a.out / "base.yaml", max_drop=a.max_drop, trials=a.trials,
                           mode=mode, seed=seed, out=out, resume=out.exists(),
                           reference=[ref_out / "reference"],
                           max_concurrent=a.max_concurrent)
            rec = res.report.get("recommended")
            best.append(rec["mse"] if rec else None)
            feasible.append(sum(o.feasible(res.budget) for o in res.observations))
            print(f"{mode} seed {seed}: best feasible worst-case MSE "
                  f"{rec['mse'] if rec else None} ({rec['label'] if rec else '-'}), "
                  f"{feasible[-1]} of {len(res.observations)} trials feasible", flush=True)
        figures[f"{mode}_best_mse"] = best
        figures[f"{mode}_feasible_trials"] = feasible
    figures["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
