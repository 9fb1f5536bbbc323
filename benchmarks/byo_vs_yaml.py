"""Your own loop vs splitcem's YAML path: does ``protect`` train the same defense?

Runs examples/byo_cifar10.py (the user's CNN cut with ``splitcem.split``, a plain PyTorch
loop with Adam, ``splitcem.protect`` noise 0.1 + CEM, ``splitcem.audit``) and
examples/byo_cifar10_yaml.py (the same CNN registered as a model, examples/byo_cifar10.yaml
through ``run_experiment``) for each seed, in fresh processes, one thread each: 5,000
CIFAR-10 training images, 6 epochs, 2,000 test images (the decoder attack learns from 90%
and is scored on the other 10%). Prints one row per run, then mean and spread per path,
and, last, one JSON object of the figures.

    python benchmarks/byo_vs_yaml.py                  # seeds 0 and 1 (about 8 min on one core)
    python benchmarks/byo_vs_yaml.py --seeds 0 1 2 --tiny
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = {"own_loop": REPO / "examples" / "byo_cifar10.py",
           "yaml": REPO / "examples" / "byo_cifar10_yaml.py"}


def run(script: Path, seed: int, out: Path, tiny: bool) -> dict[str, float]:
    cmd = [sys.executable, str(script), "--seed", str(seed), "--out", str(out), "--threads", "1"]
    if tiny:
        cmd.append("--tiny")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        sys.exit(f"{script.name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--tiny", action="store_true", help="smoke-test size")
    args = ap.parse_args()
    rows: dict[str, list[dict[str, float]]] = {k: [] for k in SCRIPTS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for path, script in SCRIPTS.items():
                r = run(script, seed, Path(tmp) / f"{path}_{seed}", args.tiny)
                rows[path].append(r)
                print(f"{path:>9} seed {seed}: accuracy {100 * r['test_accuracy']:.2f}%  "
                      f"attack MSE {r['attack_mse']:.5f}  SSIM {r['attack_ssim']:.4f}  "
                      f"train {r['train_s']:.0f} s", flush=True)
    figures: dict[str, float] = {}
    for path, rs in rows.items():
        for key, unit, scale in (("test_accuracy", "pct", 100.0), ("attack_mse", "", 1.0)):
            vals = [scale * r[key] for r in rs]
            mean = statistics.fmean(vals)
            spread = max(vals) - min(vals)
            name = f"{path}_{key}{'_' + unit if unit else ''}"
            figures[f"{name}_mean"] = round(mean, 5)
            figures[f"{name}_spread"] = round(spread, 5)
            print(f"{path:>9} {key}: mean {mean:.5f}, spread (max - min over seeds) "
                  f"{spread:.5f}")
    for key, unit in (("test_accuracy", "_pct"), ("attack_mse", "")):
        diff = figures[f"own_loop_{key}{unit}_mean"] - figures[f"yaml_{key}{unit}_mean"]
        figures[f"diff_{key}{unit}"] = round(diff, 5)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
