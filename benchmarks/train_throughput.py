"""Training throughput per numeric path, which one ``auto`` picks, and the trainer's overhead.

Trains the CPU-protocol split model (VGG11-BN cut 4, C8S1, sigmoid client; slim server) on
the same real CIFAR-10 images, no augmentation, through ``splitcem.train.Trainer`` once per
numeric path: float32 and bf16 autocast (bf16 only where the device has it natively, unless
``--all-paths``), each with the default layout and channels-last. Epochs of the paths
alternate in rotating order and the median of each is reported, with the path that
``train.amp: auto`` / ``train.channels_last: auto`` pick on this machine and
``auto_over_best`` (auto's images/s over the fastest path's; target >= 0.95). The auto path
is also timed as the five lines everyone writes (a bare loop on pre-made batches):
``ratio_trainer_over_bare`` is the trainer's overhead (target >= 0.95).

    python benchmarks/train_throughput.py [--images 4096] [--repeats 3] [--device auto]
        [--threads N] [--all-paths] [--quick]

Last line: one JSON object (images/s per path, auto's path, auto_over_best, CPU capability).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings
from typing import Any

import torch
import torch.nn.functional as F

from splitcem.config import RunConfig, load_config
from splitcem.data import BatchLoader, make_splits
from splitcem.defenses import DefenseStack, create_defense
from splitcem.experiment import build_model
from splitcem.runtime import cpu_capability, native_bf16, resolve_numeric_path, set_threads
from splitcem.train import Trainer, resolve_device


def path_name(amp: bool, channels_last: bool) -> str:
    return ("bf16" if amp else "fp32") + ("_channels_last" if channels_last else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per path")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--server-width", type=float, default=0.25)
    ap.add_argument("--noise", type=float, default=0.1, help="noise defense sigma in all loops")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=None,
                    help="CPU threads (default: $SPLITCEM_THREADS, else the free cores)")
    ap.add_argument("--all-paths", action="store_true",
                    help="also time bf16 where it is not native (float32 kernels on bf16-rounded "
                         "operands there: splitcem/_bf16.py)")
    ap.add_argument("--quick", action="store_true",
                    help="a short proof that it works: 512 images, 1 repeat")
    args = ap.parse_args()
    if args.quick:
        args.images, args.repeats = min(args.images, 512), 1
    threads = set_threads(args.threads)
    dev = resolve_device(args.device)
    native = native_bf16(dev)
    auto = resolve_numeric_path("auto", "auto", dev)
    auto_name = path_name(auto.amp, auto.channels_last)
    print(f"device {dev}, CPU capability {cpu_capability()}, native bf16: {native}, "
          f"{threads} threads; auto picks {auto_name} ({auto.reason})", flush=True)

    amps = [False, True] if (native or args.all_paths) and dev.type in ("cpu", "cuda") else [False]
    paths = [(a, c) for a in amps for c in (False, True)]
    splits = make_splits("cifar10", seed=0, limit_train=args.images, limit_test=256)
    stack = DefenseStack([create_defense("noise", sigma=args.noise)] if args.noise else [])

    def run_config(amp: bool, cl: bool) -> RunConfig:
        return load_config({
            "data": {"name": "cifar10", "limit_train": args.images, "limit_test": 256},
            "model": {"server_width": args.server_width},
            "train": {"epochs": 1000, "batch_size": args.batch_size, "milestones": [999],
                      "amp": amp, "channels_last": cl},
        })

    def make_trainer(amp: bool, cl: bool) -> Trainer:
        cfg = run_config(amp, cl)
        torch.manual_seed(0)
        model = build_model(cfg, splits)
        with warnings.catch_warnings():  # --all-paths: bf16 where not native warns
            warnings.simplefilter("ignore", RuntimeWarning)
            return Trainer(model, stack, splits, cfg.train, device=dev, seed=0,
                           progress=False, augment=False)

    trainers = {path_name(a, c): make_trainer(a, c) for a, c in paths}

    # the bare loop on auto's path: same batches, pre-materialised on the device
    model_b = build_model(run_config(auto.amp, auto.channels_last), splits).to(dev)
    model_b.load_state_dict(trainers[auto_name].model.state_dict())
    batches = list(BatchLoader(splits.train, batch_size=args.batch_size, shuffle=True,
                               augment=False, device=dev, seed=0, drop_last=True))
    opt = torch.optim.SGD(model_b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    if auto.channels_last:
        model_b.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    n_img = sum(int(y.numel()) for _, y in batches)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()  # host sync: time the work, not its launch

    def bare_epoch() -> float:
        model_b.train()
        autocast = auto.autocast()
        sync()
        t0 = time.perf_counter()
        for x, y in batches:
            with autocast:
                z = model_b.client(x).float()
            if args.noise:
                z = z + args.noise * torch.randn_like(z)
            with autocast:
                logits = model_b.server(z)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        return n_img / (time.perf_counter() - t0)

    def trainer_epoch(t: Trainer) -> float:
        sync()
        t0 = time.perf_counter()
        t.train_epoch()  # includes the epoch-end hooks
        t.epoch += 1
        sync()
        return n_img / (time.perf_counter() - t0)

    bare_epoch()  # warm-up everything (allocator, kernels)
    for t in trainers.values():
        trainer_epoch(t)
    ips: dict[str, list[float]] = {name: [] for name in trainers}
    bare: list[float] = []
    names = list(trainers)
    for r in range(args.repeats):
        order = names[r % len(names):] + names[:r % len(names)]  # rotate: no fixed position
        for name in order:
            ips[name].append(trainer_epoch(trainers[name]))
        bare.append(bare_epoch())
        print(f"repeat {r}: " + "  ".join(f"{n} {ips[n][-1]:7.1f}" for n in names)
              + f"  bare({auto_name}) {bare[-1]:7.1f} img/s", flush=True)
    med = {n: statistics.median(v) for n, v in ips.items()}
    best = max(med, key=lambda n: med[n])
    for n in names:
        mark = " <- auto" if n == auto_name else ""
        print(f"{n:>20}: {med[n]:8.1f} img/s (median of {args.repeats}){mark}")
    t_ips, b_ips = med[auto_name], statistics.median(bare)
    out: dict[str, Any] = {f"images_per_s_{n}": round(v, 1) for n, v in med.items()}
    out.update({
        "auto_path": auto_name,
        "best_path": best,
        "auto_over_best": round(med[auto_name] / med[best], 3),
        "trainer_images_per_s": round(t_ips, 1),
        "bare_images_per_s": round(b_ips, 1),
        "ratio_trainer_over_bare": round(t_ips / b_ips, 3),
        "device": str(dev),
        "cpu_capability": cpu_capability(),
        "native_bf16": native,
        "threads": threads,
        "images_per_epoch": n_img,
        "repeats": args.repeats,
    })
    print(json.dumps(out))


if __name__ == "__main__":
    main()
