"""Coverage of the frontier's intervals on simulated studies (pure numpy, no training).

For the shipped design (:mod:`splitcem.study.frontier_sim`: the committed CIFAR-10 CPU study with a
per-seed effect shared by every run of a seed) and variants, at a true gain of 0 and +20%:
the 95% intervals' coverage, the false-verdict rate (any verdict at 0, "less private" at
+20%) and the verdict rate (power at +20%), for

* ``auto``: :func:`splitcem.study.frontier.compare` as shipped (paired where seeds are shared;
  the pooled model, or the per-seed t interval where the spread test rejects);
* ``model``: the pooled model always; ``per_seed``: the per-seed t interval always;
* ``unpaired``: ``compare(..., paired=False)`` on the same (paired) data;
* ``old_bootstrap``: the percentile bootstrap splitcem used before (no envelope, each cell
  resamples its own seeds), re-implemented here for comparison.

Usage::

    python benchmarks/frontier_coverage.py [--studies 2000] [--boot 400] [--no-old]

Takes a few minutes on one core (the old bootstrap is most of it). The last stdout line is
one JSON object: ``{case}_{gain}_{coverage|false|verdicts}`` as fractions of the studies
whose setting got an interval.
"""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import numpy as np

from splitcem.study.frontier import compare
from splitcem.study.frontier_sim import SHIPPED_SEEDS, coverage, unpaired


def old_bootstrap(n_boot: int, rng_seed: int = 0):
    """The pre-issue-18 interval: seed means joined in accuracy order (no envelope); every
    cell resamples its own seeds with replacement; 2.5% / 97.5% percentiles."""
    def curve(cells: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        pts = sorted((float(c[:, 0].mean()), float(c[:, 1].mean())) for c in cells)
        return np.array([p[0] for p in pts]), np.array([p[1] for p in pts])

    def gain(acc: float, mse: float, cells: list[np.ndarray]) -> float | None:
        a, m = curve(cells)
        if acc < a[0] - 1e-12 or acc > a[-1] + 1e-12:
            return None
        return mse / float(np.interp(acc, a, m)) - 1.0

    def fn(base: Mapping[Any, Mapping[int, tuple[float, float]]],
           cell: Mapping[int, tuple[float, float]]) -> Any:
        c = np.array(list(cell.values()))
        bc = [np.array(list(b.values())) for b in base.values()]
        g = gain(float(c[:, 0].mean()), float(c[:, 1].mean()), bc)
        lo = hi = None
        if g is not None and len(c) > 1:
            rng = np.random.default_rng(rng_seed)
            gs = []
            for _ in range(n_boot):
                cs = c[rng.integers(0, len(c), len(c))]
                bs = [b[rng.integers(0, len(b), len(b))] for b in bc]
                x = gain(float(cs[:, 0].mean()), float(cs[:, 1].mean()), bs)
                if x is not None:
                    gs.append(x)
            if gs:
                lo, hi = (float(v) for v in np.quantile(gs, [0.025, 0.975]))
        iv = None if lo is None or hi is None else (lo, hi)
        v = "undecided" if iv is None or iv[0] <= 0 <= iv[1] else \
            ("more private" if iv[0] > 0 else "less private")
        return SimpleNamespace(interval=iv, verdict=v, decided=v != "undecided")
    return fn


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=2000)
    ap.add_argument("--boot", type=int, default=400, help="old bootstrap resamples")
    ap.add_argument("--no-old", action="store_true", help="skip the (slow) old bootstrap")
    args = ap.parse_args()
    three = {"base": {k: [125, 126, 127] for k in SHIPPED_SEEDS["base"]},
             "cem": {k: [125, 126, 127] for k in SHIPPED_SEEDS["cem"]}}
    def per_seed(b: Any, c: Any) -> Any:
        return compare(b, c, method="per_seed")

    def model(b: Any, c: Any) -> Any:
        return compare(b, c, method="model")

    cases: dict[str, dict[str, Any]] = {
        "auto": {}, "model": {"method": model}, "per_seed": {"method": per_seed},
        "unpaired_method": {"method": lambda b, c: compare(b, c, paired=False)},
        "unpaired_design": {"design": unpaired()},
        "three_seeds_auto": {"design": three},
        "three_seeds_per_seed": {"design": three, "method": per_seed},
    }
    for extra in (8, 12):  # every CEM run more variable than the noise runs
        cases[f"cem_spread_plus{extra}_auto"] = {"cem_extra_sd": extra / 100}
        cases[f"cem_spread_plus{extra}_model"] = {"cem_extra_sd": extra / 100,
                                                  "method": model}
    if not args.no_old:
        cases["old_bootstrap"] = {"method": old_bootstrap(args.boot)}
        cases["old_bootstrap_unpaired_design"] = {"method": old_bootstrap(args.boot),
                                                  "design": unpaired()}
    out: dict[str, float] = {"studies": args.studies}
    for name, kw in cases.items():
        for g in (0.0, 0.2):
            t = time.perf_counter()
            r = coverage(g, args.studies, **kw)
            tag = f"{name}_{'0' if g == 0 else '+20pct'}"
            out |= {f"{tag}_coverage": round(r["coverage"], 4),
                    f"{tag}_false": round(r["false_verdicts"], 4),
                    f"{tag}_verdicts": round(r["verdicts"], 4)}
            print(f"{tag}: {r} ({time.perf_counter() - t:.0f} s)", flush=True)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
