"""What one trial of the CIFAR-10 CPU protocol costs: training, and the attacks before / after.

One model of the protocol (noise 0.1 + CEM lambda 3, seed 127: the committed run
results/cifar10_cpu/noise0.1_cem3_s127, whose config this trains) is trained once, on one
thread, or taken from ``--run-dir``. Then the protocol's attack suite (``decoder`` +
``decoder_adaptive``, the worst case of the two) runs on that model on each path:

* ``before``: the reference path, ``encode: every_epoch`` (the encoder runs on every batch
  of every epoch, as the committed runs did);
* ``after``: ``encode: once`` (clean features cached once, the defense's transform applied
  afresh at every step);
* ``after_es`` (with ``--early-stop N``): ``after`` plus early stopping on a held-out 5% of
  the auxiliary images, patience N epochs.

Each path runs in its own single-threaded process (with ``--parallel``: one process per
path and attack, all side by side); an attack's cost is its process's CPU time
(core-seconds), which other jobs on a shared machine inflate less than wall time. The
ratio of two paths measured in one run is the figure that counts. Trained here, training
is measured the same way; taken from ``--run-dir``, it is the run record's training
seconds (wall time of a one-thread run) or ``--train-core-s``.

Usage (from the repository root, with ``PYTHONPATH=.`` so that it runs this checkout)::

    python benchmarks/trial_cost.py --out /tmp/trial_cost                # train, then attack
    python benchmarks/trial_cost.py --run-dir RUN_DIR --parallel         # attack a trained run
    python benchmarks/trial_cost.py --limit-train 512 --limit-test 512 --epochs 1 \\
        --attack-epochs 2 --out /tmp/tc_smoke                            # smoke run, minutes

The last stdout line is one JSON object: ``train_s``, ``attack_before_s``,
``attack_after_s`` (core-seconds), ``attack_speedup``, ``trial_speedup`` (x),
``mse_before``, ``mse_after`` (worst-case MSE on [0, 1] images), per-attack figures.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "results" / "cifar10_cpu" / "noise0.1_cem3_s127" / "config.yaml"
PATHS: dict[str, dict[str, Any]] = {
    "before": {"encode": "every_epoch"},
    "after": {"encode": "once"},
}


def _one_thread() -> None:
    os.environ["OMP_NUM_THREADS"] = os.environ["SPLITCEM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)


def _cpu() -> str:
    """The CPU model and whether it has bf16 instructions (from /proc/cpuinfo)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return "unknown"
    model = next((ln.split(":", 1)[1].strip() for ln in text.splitlines()
                  if ln.startswith("model name")), "unknown")
    flags = sorted({f for f in ("avx512_bf16", "amx_bf16") if f in text.split()})
    return f"{model} ({', '.join(flags) or 'no bf16 instructions'})"


def train(args: argparse.Namespace) -> tuple[Path, float, str]:
    """Train the protocol's model into ``args.out``; (run dir, core-seconds, source)."""
    from splitcem.config import load_config
    from splitcem.experiment import train_run

    sets = []
    if args.limit_train:
        sets.append(f"data.limit_train={args.limit_train}")
    if args.limit_test:
        sets.append(f"data.limit_test={args.limit_test}")
    if args.epochs:
        sets.append(f"train.epochs={args.epochs}")
        if args.epochs == 1:
            sets += ["train.warmup_epochs=0", "cem.warmup_epochs=0"]
    cfg = load_config(CONFIG, sets)
    run_dir = Path(args.out) / cfg.name
    t0 = time.process_time()
    train_run(cfg, run_dir, overwrite=True, progress=False)
    return run_dir, time.process_time() - t0, "trained here (process CPU seconds)"


def attack_path(run_dir: str, label: str, params: dict[str, Any], which: list[int],
                attack_epochs: int, result_file: str) -> None:
    """Child process: the protocol's attacks number ``which`` on one path; writes their
    figures (and results, for the worst case) as JSON."""
    _one_thread()
    from splitcem.attacks import AttackTarget, run_attacks
    from splitcem.experiment import load_trained

    p = load_trained(run_dir)
    target = AttackTarget(p.model.client, p.stack, p.splits.train.info, p.device)
    out: dict[str, Any] = {}
    for i in which:
        spec = {**p.cfg.attack.attacks[i], **params,
                **({"epochs": attack_epochs} if attack_epochs else {})}
        c0, w0 = time.process_time(), time.perf_counter()
        rep = run_attacks(target, p.splits, [spec], threat=p.cfg.attack.threat,
                          progress=False)
        cpu, wall = time.process_time() - c0, time.perf_counter() - w0
        (name, r), = rep.results.items()
        out[name] = {
            "core_s": round(cpu, 1), "wall_s": round(wall, 1), "metrics": r.metrics,
            "epochs_run": r.extra.get("epochs_run"), "features": r.extra.get("features"),
            "numerics": r.extra.get("numerics"), "early_stop": r.extra.get("early_stop"),
            "train_loss": r.extra.get("train_loss")}
        print(f"[{label}] {name}: {cpu:.1f} core-s ({wall:.1f} s wall), "
              f"MSE {r.metrics['mse']:.5f}", flush=True)
    Path(result_file).write_text(json.dumps(out))


def summarise(parts: list[dict[str, Any]]) -> dict[str, Any]:
    """One path's attacks (from its processes): per attack, total core-s, worst case."""
    import torch

    from splitcem.attacks import AttackResult, worst_case

    attacks = {k: v for part in parts for k, v in part.items()}
    empty = torch.zeros(0)
    worst = worst_case({k: AttackResult(k, v["metrics"], empty, empty, v["wall_s"])
                        for k, v in attacks.items()})["mse"]
    return {"attacks": attacks, "worst_mse": worst["value"], "worst_attack": worst["attack"],
            "core_s": round(sum(v["core_s"] for v in attacks.values()), 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--run-dir", help="a trained run of the protocol (skips training)")
    ap.add_argument("--out", default="/tmp/trial_cost", help="where to train (no --run-dir)")
    ap.add_argument("--limit-train", type=int, default=0, help="smoke: training images")
    ap.add_argument("--limit-test", type=int, default=0, help="smoke: test images")
    ap.add_argument("--epochs", type=int, default=0, help="smoke: training epochs")
    ap.add_argument("--attack-epochs", type=int, default=0, help="smoke: decoder epochs")
    ap.add_argument("--early-stop", type=int, default=0,
                    help="also run the after path with early stopping, this patience")
    ap.add_argument("--parallel", action="store_true", help="run the paths side by side")
    ap.add_argument("--train-core-s", type=float, default=0.0,
                    help="with --run-dir: the training's core-seconds, measured outside "
                         "(e.g. utime + stime of the training process); default: the run "
                         "record's training seconds (wall)")
    args = ap.parse_args()
    _one_thread()
    from splitcem.config import load_config

    print(f"CPU: {_cpu()}", flush=True)
    if args.run_dir:
        run_dir = Path(args.run_dir)
        record = json.loads((run_dir / "metrics.json").read_text())
        train_s, source = float(record["train"]["seconds"]), "run record (wall, one thread)"
        if args.train_core_s:
            train_s, source = args.train_core_s, "--train-core-s (measured outside)"
    else:
        run_dir, train_s, source = train(args)
    print(f"training: {train_s:.1f} core-s ({source})", flush=True)
    paths = dict(PATHS)
    if args.early_stop:
        paths["after_es"] = {"encode": "once", "early_stop": args.early_stop}
    ctx = mp.get_context("spawn")
    n_attacks = len(load_config(run_dir / "config.yaml").attack.attacks)
    # one process per path, or with --parallel one per (path, attack), all side by side
    jobs = [(k, [i]) for k in paths for i in range(n_attacks)] if args.parallel else \
        [(k, list(range(n_attacks))) for k in paths]
    files = [str(run_dir / f"trial_cost_{k}_{'_'.join(map(str, w))}.json") for k, w in jobs]
    procs = []
    for (k, which), f in zip(jobs, files, strict=True):
        proc = ctx.Process(target=attack_path, args=(str(run_dir), k, paths[k], which,
                                                     args.attack_epochs, f))
        proc.start()
        procs.append(proc)
        if not args.parallel:
            proc.join()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        sys.exit("an attack process failed; see its output above")
    res = {k: summarise([json.loads(Path(f).read_text())
                         for (k2, _), f in zip(jobs, files, strict=True) if k2 == k])
           for k in paths}
    b, a = res["before"], res["after"]
    print(f"attacks before: {b['core_s']:.1f} core-s, worst-case MSE {b['worst_mse']:.5f} "
          f"({b['worst_attack']})")
    print(f"attacks after:  {a['core_s']:.1f} core-s, worst-case MSE {a['worst_mse']:.5f} "
          f"({a['worst_attack']})")
    figures: dict[str, Any] = {
        "cpu": _cpu(), "train_source": source, "train_s": round(train_s, 1),
        "attack_before_s": b["core_s"], "attack_after_s": a["core_s"],
        "attack_speedup": round(b["core_s"] / a["core_s"], 3),
        "trial_speedup": round((train_s + b["core_s"]) / (train_s + a["core_s"]), 3),
        "mse_before": round(b["worst_mse"], 6), "mse_after": round(a["worst_mse"], 6),
        "mse_change_pct": round(100 * (a["worst_mse"] / b["worst_mse"] - 1), 2),
        "per_attack": {k: {n: {"core_s": v["core_s"], "mse": round(v["metrics"]["mse"], 6),
                               "epochs_run": v["epochs_run"]}
                           for n, v in r["attacks"].items()} for k, r in res.items()},
    }
    if "after_es" in res:
        e = res["after_es"]
        figures.update({
            "attack_after_es_s": e["core_s"], "mse_after_es": round(e["worst_mse"], 6),
            "attack_speedup_es": round(b["core_s"] / e["core_s"], 3),
            "trial_speedup_es": round((train_s + b["core_s"]) / (train_s + e["core_s"]), 3)})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
