"""Error rates of *seeds until decided* on simulated studies (pure numpy, no training).

A fixed-size 95% interval looked at after every added seed, stopping at the first verdict,
gives a verdict more often than 5% when the truth is 0 (optional stopping).
:func:`splitcem.study.frontier_sim.until_decided` runs the sweep's own planner on studies
of the bundled sweep's frontier (noise sigma 0.1 / 0.15 / 0.2 / 0.3 and lambda 1 on 2 seeds,
lambda 3 on 3, lambda 10 on 2; lambda 3 and 10 until decided, max 8). This compares judging
every look at 95% (what splitcem did before) with the shipped per-look level
(:func:`splitcem.study.frontier_plan.sequential_level` over 7 looks) and a few others, at a
true gain of 0 and of ``--gain``:

* ``false``: a verdict at a true gain of 0 (the wrong sign at ``--gain``);
* ``verdicts``: any verdict (power, at a non-zero gain);
* ``coverage``: the final interval (at that level) covers the truth;
* ``seeds``: the mean number of seeds a setting ended with.

Each level runs twice: with the planner's reach rule (the shipped planner: a setting whose
decision is out of reach of max at the spread seen is left undecided) and without it
(``reach=False``, figures named ``level{L}_noreach_...``: every undecided setting seeded up
to max), to show what the rule costs in power and saves in seeds.

Usage::

    python benchmarks/until_decided.py [--studies 1000] [--levels 0.95 0.99]

The last stdout line is one JSON object: ``level{L}_gain{G}_{false|verdicts|coverage|seeds}``
(fractions; seeds a count) and ``seconds``.
"""

from __future__ import annotations

import argparse
import json
import time

from splitcem.study.frontier_plan import sequential_level
from splitcem.study.frontier_sim import until_decided


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=1000)
    ap.add_argument("--levels", type=float, nargs="+",
                    default=[0.95, 0.98, round(sequential_level(7), 5)])
    ap.add_argument("--gain", type=float, default=0.2)
    a = ap.parse_args()
    out: dict[str, float] = {}
    t0 = time.perf_counter()
    for level, reach in [(lv, r) for lv in a.levels for r in (True, False)]:
        tag = "" if reach else "_noreach"
        for gain in (0.0, a.gain):
            r = until_decided(gain, a.studies, level=level, reach=reach)
            print(f"each look at {level:.5f}{', no reach rule' if tag else ''}, true gain "
                  f"{gain:+.0%}: " + ", ".join(f"{k} {v:.3f}" for k, v in r.items()
                                              if k != "level"), flush=True)
            out |= {f"level{level}{tag}_gain{gain}_{k}": round(v, 4) for k, v in r.items()
                    if k != "level"}
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
