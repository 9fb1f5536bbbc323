"""How fast run records are read: every committed run under ``results/``, loaded as the
planner, ``--list`` and ``frontier`` load them (:meth:`splitcem.record.RunRecord.find`, which
parses each ``config.yaml`` through :func:`splitcem.config.load_config`).

Paired, interleaved over ``--rounds``: the shipped loader (libyaml's ``CSafeLoader`` where
PyYAML has it) against PyYAML's pure-Python ``SafeLoader``, which splitcem used before.

Usage::

    python benchmarks/record_read.py [--results results/cifar10_cpu] [--rounds 3]

The last stdout line is one JSON object: ``{c,python}_ms_per_record`` (medians over rounds),
``speedup`` (python / c), ``records`` and ``libyaml`` (whether the C loader was there).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import yaml

import splitcem.config as config
from splitcem.record import RunRecord


def _read(folder: Path) -> tuple[int, float]:
    """(records read, seconds) for every run under ``folder``, configs included."""
    t0 = time.perf_counter()
    n = sum(r.config is not None for r in RunRecord.find([folder]))
    return n, time.perf_counter() - t0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", type=Path, default=Path("results/cifar10_cpu"))
    ap.add_argument("--rounds", type=int, default=3)
    a = ap.parse_args()
    if not a.results.is_dir():
        raise SystemExit(f"{a.results} is not a folder of runs; pass --results DIR")
    loaders = {"c": config._SAFE_LOADER, "python": yaml.SafeLoader}
    ms: dict[str, list[float]] = {k: [] for k in loaders}
    n = 0
    for r in range(a.rounds):
        for name in list(loaders)[r % 2:] + list(loaders)[:r % 2]:
            config._SAFE_LOADER = loaders[name]
            n, sec = _read(a.results)
            ms[name].append(1000 * sec / max(n, 1))
            print(f"round {r + 1}: {name} loader {ms[name][-1]:.2f} ms per record ({n})",
                  flush=True)
    config._SAFE_LOADER = loaders["c"]
    med = {k: statistics.median(v) for k, v in ms.items()}
    print(json.dumps({"c_ms_per_record": round(med["c"], 3),
                      "python_ms_per_record": round(med["python"], 3),
                      "speedup": round(med["python"] / med["c"], 2), "records": n,
                      "libyaml": loaders["c"] is not yaml.SafeLoader}))


if __name__ == "__main__":
    main()
