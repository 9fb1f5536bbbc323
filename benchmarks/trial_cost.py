"""What one trial of the CIFAR-10 CPU protocol costs: training, and the attacks before / after.

One model of the protocol (noise 0.1 + CEM lambda 3, seed 127: the committed run
results/cifar10_cpu/noise0.1_cem3_s127, whose config this trains) is trained once, on one
thread, or taken from ``--run-dir``. Then two attack suites run on that model, and the worst
case of each is taken:

* ``before``: the reference, as the first committed runs were attacked: ``decoder`` and
  ``decoder_adaptive`` (2 draws), 25 epochs each, each from random weights, on
  ``encode: every_epoch`` (the encoder runs on every batch of every epoch);
* ``after``: the protocol's attacks as the bundled sweep file
  (configs/sweeps/cifar10_cpu.yaml) now sets them: ``encode: once`` (clean features cached
  once, the defense's transform applied afresh at every step) and ``decoder_adaptive``
  continuing the plain decoder's training (``init_from: decoder``) for its own, fewer
  epochs instead of training from random weights;
* with ``--adaptive-epochs E ...``: ``after`` also runs the warm-started adaptive decoder
  for each E (each from the same plain decoder), so that its epochs can be chosen from one
  run (``per_attack`` / ``variants`` in the JSON).

Each path runs in its own single-threaded process (with ``--parallel`` the two side by
side, as two trials share a 2-core machine); an attack's cost is the CPU time its process spent
on it (core-seconds, read when the suite logs the attack's result), which other jobs on a
shared machine inflate less than wall time. The ratio of two paths measured in one run is
the figure that counts. Trained here, training is measured the same way; taken from
``--run-dir``, it is the run record's training seconds (wall time of a one-thread run) or
``--train-core-s``.

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
import logging
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "results" / "cifar10_cpu" / "noise0.1_cem3_s127" / "config.yaml"
SWEEP = REPO / "splitcem" / "configs" / "sweeps" / "cifar10_cpu.yaml"
#: the reference: the attacks the first committed runs had, on the re-encoding path
BEFORE: list[dict[str, Any]] = [
    {"name": "decoder", "epochs": 25, "width": 48, "depth": 4, "amp": "auto",
     "encode": "every_epoch"},
    {"name": "decoder_adaptive", "draws": 2, "epochs": 25, "width": 48, "depth": 4,
     "amp": "auto", "encode": "every_epoch"},
]


def after_specs() -> list[dict[str, Any]]:
    """The protocol's attacks as the bundled sweep file sets them."""
    from splitcem.study.grid import load_sweep

    return [dict(a) for a in load_sweep(SWEEP).set["attack.attacks"]]


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


class _AttackClock(logging.Handler):
    """Process CPU time at the moment the suite logs each attack's result."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.marks: list[tuple[str, float, float]] = []  # (label, cpu s, wall s)

    def emit(self, record: logging.LogRecord) -> None:
        if record.msg == "attack %s: %s" and isinstance(record.args, tuple):
            self.marks.append((str(record.args[0]), time.process_time(), time.perf_counter()))


def attack_path(run_dir: str, label: str, specs: list[dict[str, Any]],
                result_file: str) -> None:
    """Child process: one suite of ``specs`` (an ``init_from`` chain runs in one suite) on
    the trained run; writes each attack's core-seconds and figures as JSON."""
    _one_thread()
    from splitcem.attacks import AttackTarget, run_attacks
    from splitcem.experiment import load_trained

    p = load_trained(run_dir)
    target = AttackTarget(p.model.client, p.stack, p.splits.train.info, p.device)
    clock = _AttackClock()
    logger = logging.getLogger("splitcem.attacks.suite")
    logger.setLevel(logging.INFO)
    logger.addHandler(clock)
    c0, w0 = time.process_time(), time.perf_counter()
    rep = run_attacks(target, p.splits, specs, threat=p.cfg.attack.threat, progress=False)
    out: dict[str, Any] = {}
    for name, cpu, wall in clock.marks:
        r = rep.results[name]
        out[name] = {
            "core_s": round(cpu - c0, 1), "wall_s": round(wall - w0, 1), "metrics": r.metrics,
            "epochs_run": r.extra.get("epochs_run"), "features": r.extra.get("features"),
            "init_from": r.extra.get("init_from"), "numerics": r.extra.get("numerics"),
            "train_loss": r.extra.get("train_loss")}
        print(f"[{label}] {name}: {cpu - c0:.1f} core-s ({wall - w0:.1f} s wall), "
              f"MSE {r.metrics['mse']:.5f}", flush=True)
        c0, w0 = cpu, wall
    Path(result_file).write_text(json.dumps(out))


def summarise(attacks: dict[str, dict[str, Any]], labels: list[str]) -> dict[str, Any]:
    """The suite of ``labels`` (each attack's figures in ``attacks``): total core-seconds
    and the worst case."""
    import torch

    from splitcem.attacks import AttackResult, worst_case

    empty = torch.zeros(0)
    worst = worst_case({k: AttackResult(k, attacks[k]["metrics"], empty, empty, 0.0)
                        for k in labels})["mse"]
    return {"labels": labels, "worst_mse": worst["value"], "worst_attack": worst["attack"],
            "core_s": round(sum(attacks[k]["core_s"] for k in labels), 1)}


def _label(spec: dict[str, Any]) -> str:
    return str(spec.get("label", spec["name"]))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    ap.add_argument("--run-dir", help="a trained run of the protocol (skips training)")
    ap.add_argument("--out", default="/tmp/trial_cost", help="where to train (no --run-dir)")
    ap.add_argument("--limit-train", type=int, default=0, help="smoke: training images")
    ap.add_argument("--limit-test", type=int, default=0, help="smoke: test images")
    ap.add_argument("--epochs", type=int, default=0, help="smoke: training epochs")
    ap.add_argument("--attack-epochs", type=int, default=0, help="smoke: decoder epochs")
    ap.add_argument("--adaptive-epochs", type=int, nargs="*", default=[],
                    help="also run the warm-started adaptive decoder for these epochs")
    ap.add_argument("--parallel", action="store_true", help="run the paths side by side")
    ap.add_argument("--train-core-s", type=float, default=0.0,
                    help="with --run-dir: the training's core-seconds, measured outside "
                         "(e.g. utime + stime of the training process); default: the run "
                         "record's training seconds (wall)")
    args = ap.parse_args()
    _one_thread()
    print(f"CPU: {_cpu()}", flush=True)
    if args.run_dir:
        run_dir = Path(args.run_dir)
        record = json.loads((run_dir / "metrics.json").read_text())
        train_s = float(record["train"]["seconds"])
        source_note = "run record (wall, one thread)"
        if args.train_core_s:
            train_s, source_note = args.train_core_s, "--train-core-s (measured outside)"
    else:
        run_dir, train_s, source_note = train(args)
    print(f"training: {train_s:.1f} core-s ({source_note})", flush=True)
    before, after = BEFORE, after_specs()
    if args.attack_epochs:  # smoke: every attack of both paths this many epochs
        before, after = ([{**s, "epochs": args.attack_epochs} for s in specs]
                         for specs in (BEFORE, after))
    chain = list(after)
    src = next((str(a["init_from"]) for a in after if a.get("init_from")), _label(after[0]))
    for e in args.adaptive_epochs:  # more warm-started adaptive decoders, to choose E
        base = next(a for a in after if a["name"] == "decoder_adaptive")
        chain.append({**base, "epochs": e, "label": f"decoder_adaptive_e{e}",
                      "init_from": src})
    ctx = mp.get_context("spawn")
    # one process per path (an init_from chain runs in one suite); --parallel: side by side
    jobs = [("before", before), ("after", chain)]
    files = [str(run_dir / f"trial_cost_{k}_{i}.json") for i, (k, _) in enumerate(jobs)]
    procs = []
    for (k, specs), f in zip(jobs, files, strict=True):
        proc = ctx.Process(target=attack_path, args=(str(run_dir), k, specs, f))
        proc.start()
        procs.append(proc)
        if not args.parallel:
            proc.join()
    for proc in procs:
        proc.join()
    if any(proc.exitcode for proc in procs):
        sys.exit("an attack process failed; see its output above")
    per_path: dict[str, dict[str, Any]] = {"before": {}, "after": {}}
    for (k, _), f in zip(jobs, files, strict=True):
        per_path[k].update(json.loads(Path(f).read_text()))
    b = summarise(per_path["before"], [_label(s) for s in before])
    a = summarise(per_path["after"], [_label(s) for s in after])
    print(f"attacks before: {b['core_s']:.1f} core-s, worst-case MSE {b['worst_mse']:.5f} "
          f"({b['worst_attack']})")
    print(f"attacks after:  {a['core_s']:.1f} core-s, worst-case MSE {a['worst_mse']:.5f} "
          f"({a['worst_attack']})")
    variants = {}
    for e in args.adaptive_epochs:
        v = summarise(per_path["after"], [src, f"decoder_adaptive_e{e}"])
        variants[f"adaptive_epochs_{e}"] = {
            "attack_s": v["core_s"], "worst_mse": round(v["worst_mse"], 6),
            "attack_speedup": round(b["core_s"] / v["core_s"], 3),
            "trial_speedup": round((train_s + b["core_s"]) / (train_s + v["core_s"]), 3),
            "mse_change_pct": round(100 * (v["worst_mse"] / b["worst_mse"] - 1), 2)}
        print(f"  adaptive warm-started for {e} epochs: {v['core_s']:.1f} core-s, worst-case "
              f"MSE {v['worst_mse']:.5f}")
    figures: dict[str, Any] = {
        "cpu": _cpu(), "train_source": source_note, "train_s": round(train_s, 1),
        "attack_before_s": b["core_s"], "attack_after_s": a["core_s"],
        "attack_speedup": round(b["core_s"] / a["core_s"], 3),
        "trial_speedup": round((train_s + b["core_s"]) / (train_s + a["core_s"]), 3),
        "mse_before": round(b["worst_mse"], 6), "mse_after": round(a["worst_mse"], 6),
        "mse_change_pct": round(100 * (a["worst_mse"] / b["worst_mse"] - 1), 2),
        "after_specs": after,
        "per_attack": {k: {n: {"core_s": v["core_s"], "mse": round(v["metrics"]["mse"], 6),
                               "epochs_run": v["epochs_run"], "init_from": v["init_from"]}
                           for n, v in r.items()} for k, r in per_path.items()},
        "variants": variants,
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
