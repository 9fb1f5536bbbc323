"""What Ray costs and what concurrency buys: one 8-trial sweep, run four ways.

The sweep: noise sigma in {0.05, 0.1, 0.15, 0.2} x 2 seeds on a CIFAR-10 subset (the CPU
protocol's model at reduced width, a short decoder attack), sized so that one trial takes
about a minute on one core of a 2-core machine (48.7 s measured with AVX512-BF16; longer
where float32 is the fast path). Each way runs the whole sweep from scratch
into its own folder through :func:`splitcem.study.trials.run_grid`:

* ``loop``: the trials one after another in this process (``--no-ray``), 1 thread each;
* ``ray1``: on a local Ray, 1 trial at a time, 1 thread each (Ray start-up, worker
  processes and the shutdown all count: that is the overhead a user pays);
* ``ray2``: on a local Ray, 2 trials at a time, 1 thread each;
* ``ray1x2`` (with ``--threads``): 1 trial at a time with 2 threads: on a 2-core machine,
  two 1-thread trials against one 2-thread trial.

Figures: Ray overhead against the loop (``(ray1 - loop) / loop``; the issue's target is at
most 10% on trials of about a minute) and the speed-up of concurrency (``ray1 / ray2``).
Run it on a quiet machine: other load changes every figure.

Usage::

    python benchmarks/sweep_scaling.py                  # ~50 s trials (about 17 min in all)
    python benchmarks/sweep_scaling.py --threads        # + one 2-thread trial at a time (~21 min)
    python benchmarks/sweep_scaling.py --quick          # tiny trials: proves it works

The last stdout line is one JSON object of the figures (units in the names).
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from splitcem.study.trials import Engine, run_grid


def sweep_spec(root: str | None, *, quick: bool) -> dict[str, Any]:
    """The 8-trial sweep (a dict in the sweep-file format)."""
    data: dict[str, Any] = {"name": "cifar10", "root": root,
                            "augment": {"crop_pad": 4, "flip": True, "rotation": 0.0}}
    if quick:
        data.update(limit_train=256, limit_test=128)
        model = {"client_width": 0.125, "server_width": 0.125}
        train = {"epochs": 1, "batch_size": 64, "warmup_epochs": 0}
        attack = {"name": "decoder", "epochs": 1, "width": 8, "depth": 1}
    else:  # about a minute per trial on one core of a 2-core AVX512-BF16 machine
        data.update(limit_train=10000, limit_test=2000)
        model = {"client_width": 0.5, "server_width": 0.25}
        train = {"epochs": 6, "batch_size": 128, "warmup_epochs": 1, "amp": "auto",
                 "channels_last": "auto"}
        attack = {"name": "decoder", "epochs": 12, "width": 32, "depth": 2, "amp": "auto"}
    return {
        "name": "sweep_scaling",
        "set": {"device": "cpu", "data": data, "model": {"arch": "vgg11_bn", "cut": 4, **model},
                "train": {"lr": 0.05, "schedule": "cosine", **train},
                "defenses": [{"name": "noise", "sigma": 0.1}], "cem": {"lambda": 0.0},
                "attack": {"attacks": [attack], "leakage": False}},
        "seeds": 2,
        "variants": [{"name": "noise{sigma}", "grid": {"defenses.0.sigma":
                                                       [0.05, 0.1, 0.15, 0.2]}}],
    }


def timed(spec: dict[str, Any], out: Path, **kw: Any) -> float:
    if out.exists():
        shutil.rmtree(out)
    t0 = time.perf_counter()
    res = run_grid(spec, out=out, engine=Engine(progress=False, **kw))
    seconds = time.perf_counter() - t0
    if res.failed:
        errs = {n: res.statuses[n].get("error") for n in res.failed}
        raise SystemExit(f"trials failed: {errs}")
    assert len(res.ran) == 8, res.ran
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="tiny trials (seconds): a smoke run")
    ap.add_argument("--threads", action="store_true",
                    help="also one 2-thread trial at a time (vs two 1-thread trials)")
    ap.add_argument("--root", default=None, help="CIFAR-10 location (default: searched)")
    ap.add_argument("--keep", type=Path, default=None, help="keep the runs in this folder")
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(1)

    spec = sweep_spec(args.root, quick=args.quick)
    work = args.keep or Path(tempfile.mkdtemp(prefix="sweep_scaling_"))
    try:
        # the data cache is warmed once, outside every timing
        from splitcem.data import make_splits
        d = spec["set"]["data"]
        make_splits("cifar10", root=d["root"], limit_train=d["limit_train"],
                    limit_test=d["limit_test"])
        fig: dict[str, Any] = {"trials": 8, "quick": args.quick}
        fig["loop_s"] = timed(spec, work / "loop", use_ray=False, threads_per_trial=1)
        print(f"loop   (1 trial at a time, in-process, 1 thread): {fig['loop_s']:.1f} s")
        fig["ray1_s"] = timed(spec, work / "ray1", max_concurrent=1, threads_per_trial=1)
        print(f"ray1   (1 trial at a time, 1 thread):             {fig['ray1_s']:.1f} s")
        fig["ray2_s"] = timed(spec, work / "ray2", max_concurrent=2, threads_per_trial=1)
        print(f"ray2   (2 trials at a time, 1 thread each):       {fig['ray2_s']:.1f} s")
        if args.threads:
            fig["ray1x2_s"] = timed(spec, work / "ray1x2", max_concurrent=1,
                                    threads_per_trial=2)
            print(f"ray1x2 (1 trial at a time, 2 threads):            {fig['ray1x2_s']:.1f} s")
            fig["two_1thread_vs_one_2thread_speedup"] = fig["ray1x2_s"] / fig["ray2_s"]
        fig["trial_s_loop"] = fig["loop_s"] / 8
        fig["ray_overhead_pct"] = 100 * (fig["ray1_s"] / fig["loop_s"] - 1)
        fig["concurrency_speedup"] = fig["ray1_s"] / fig["ray2_s"]
        print(f"trial (loop): {fig['trial_s_loop']:.1f} s; Ray overhead vs loop: "
              f"{fig['ray_overhead_pct']:+.1f}%; 2 concurrent vs 1: "
              f"{fig['concurrency_speedup']:.2f}x")
        if args.threads:
            print(f"two 1-thread trials vs one 2-thread trial: "
                  f"{fig['two_1thread_vs_one_2thread_speedup']:.2f}x (> 1: two 1-thread "
                  "trials are faster)")
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)
    print(json.dumps({k: round(v, 3) if isinstance(v, float) else v for k, v in fig.items()}))


if __name__ == "__main__":
    main()
