"""What a checkpoint within an epoch costs a trial of the CIFAR-10 CPU protocol.

Training writes ``checkpoints/partial.pt`` every 10 minutes within an epoch
(:mod:`splitcem.train`). With CEM on, it carries the epoch's feature bank (the clean
features of every batch so far, float32: at the bottleneck of 16 channels 256 floats per
image, so the bank grows to about 51 MB by an epoch's end). This builds one trial of the
bundled zoo sweep (``--trial``, default the bottleneck of 16 channels with CEM lambda 3) on
the real CIFAR-10 splits, fills its CEM bank as far into the epoch as ``--fraction`` (through
the public :meth:`~splitcem.defenses.Defense.load_epoch_state`; random features: only their
size matters here), then times writing the checkpoint (``--repeats`` times, median) and
reading it back for a resume. No training: the figures are the file's size, the seconds per
write and per resume, and the share of a 10-minute interval the write takes.

    PYTHONPATH=. python benchmarks/checkpoint_cost.py [--trial NAME] [--fraction 0.5]
        [--repeats 3] [--dir /tmp/ckpt_cost]

Last line: one JSON object (``partial_mb``, ``save_s``, ``resume_s``,
``overhead_pct_at_600s``, ``bank_rows``, ``trial``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from splitcem.experiment import prepare
from splitcem.study.grid import expand, load_sweep
from splitcem.train import CHECKPOINT_EVERY_S, Trainer

SWEEP = Path(__file__).resolve().parent.parent / "configs" / "sweeps" / "cifar10_cpu.yaml"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--trial", default="bottleneck16_cem3_s125",
                    help="a trial of configs/sweeps/cifar10_cpu.yaml")
    ap.add_argument("--fraction", type=float, default=0.5,
                    help="how far into the epoch the bank is filled (0 to 1)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--dir", default=None, help="where to write (default: a temporary folder)")
    args = ap.parse_args()
    if not 0 <= args.fraction <= 1:
        raise SystemExit(f"--fraction must be in [0, 1], got {args.fraction}")
    trials = {t.name: t for t in expand(load_sweep(SWEEP))}
    if args.trial not in trials:
        raise SystemExit(f"no trial {args.trial!r} in {SWEEP}; e.g. {next(iter(trials))}")
    cfg = trials[args.trial].cfg
    torch.set_num_threads(1)
    p = prepare(cfg, device="cpu")
    out = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(prefix="ckpt_cost_"))
    try:
        tr = Trainer(p.model, p.stack, p.splits, cfg.train, device=p.device, seed=cfg.seed,
                     run_dir=out, progress=False, checkpoint_every=0.0)
        if not tr.stack.mid_epoch_resumable:
            raise SystemExit(f"{args.trial}: its defenses are checkpointed at epoch ends only")
        batches = len(tr.loader)
        done = int(args.fraction * batches)
        rows = done * cfg.train.batch_size
        dim = int(torch.Size(p.model.feature_shape).numel())
        g = torch.Generator().manual_seed(0)
        bank = (torch.rand(rows, dim, generator=g), torch.randint(0, 10, (rows,), generator=g))
        states = [st if d.name != "cem" else {"bank": bank if rows else None, "watch": None}
                  for d, st in zip(tr.stack, tr.stack.epoch_state(), strict=True)]
        tr.stack.load_epoch_state(states)
        zero = torch.zeros(())
        progress = {"batch": done, "seen": rows, "loss_sum": zero, "correct": zero,
                    "extra_sums": {}, "train_seconds": 0.0}
        saves = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            tr._save_partial(progress)
            saves.append(time.perf_counter() - t0)
        assert tr.partial_path is not None
        size_mb = tr.partial_path.stat().st_size / 1e6
        resumed = Trainer(p.model, p.stack, p.splits, cfg.train, device=p.device,
                          seed=cfg.seed, run_dir=out, progress=False)
        t0 = time.perf_counter()
        resumed.load_state_dict(resumed._furthest_checkpoint())
        resume_s = time.perf_counter() - t0
    finally:
        if not args.dir:
            shutil.rmtree(out, ignore_errors=True)
    save_s = statistics.median(saves)
    print(f"{args.trial}: bank of {rows} rows x {dim} floats ({done}/{batches} batches): "
          f"partial.pt {size_mb:.0f} MB, written in {save_s:.2f} s (median of {len(saves)}), "
          f"read back for a resume in {resume_s:.2f} s")
    print(json.dumps({
        "trial": args.trial, "bank_rows": rows, "feature_dim": dim,
        "partial_mb": round(size_mb, 1), "save_s": round(save_s, 3),
        "resume_s": round(resume_s, 3),
        "overhead_pct_at_600s": round(100 * save_s / CHECKPOINT_EVERY_S, 3),
    }))


if __name__ == "__main__":
    main()
