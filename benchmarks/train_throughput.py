"""Training throughput of the project's trainer against a bare PyTorch loop, same layers.

Both train the CPU-protocol split model (VGG11-BN cut 4, C8S1, sigmoid client; slim server)
on the same real CIFAR-10 images with no augmentation: the trainer through
``splitcem.train.Trainer.train_epoch`` (defense stack, LR schedule, progress bar, metric
accumulation, epoch-end hooks), the bare loop as the five lines everyone writes. Epochs
alternate between the two, and the median of each is reported.

    python benchmarks/train_throughput.py [--images 4096] [--repeats 3] [--device cpu] [--fp32]

Last line: JSON with images/s of both and their ratio (target >= 0.95).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

from splitcem.config import load_config
from splitcem.data import BatchLoader
from splitcem.defenses import DefenseStack, create_defense
from splitcem.experiment import build_model
from splitcem.train import Trainer, resolve_device


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--server-width", type=float, default=0.25)
    ap.add_argument("--noise", type=float, default=0.1, help="noise defense sigma in both loops")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--fp32", action="store_true",
                    help="no bf16 autocast / channels-last (the CPU protocol uses both)")
    args = ap.parse_args()
    dev = resolve_device(args.device)

    from splitcem.data import make_splits

    cfg = load_config({
        "data": {"name": "cifar10", "limit_train": args.images, "limit_test": 256},
        "model": {"server_width": args.server_width},
        "train": {"epochs": 100, "batch_size": args.batch_size, "milestones": [99],
                  "amp": not args.fp32, "channels_last": not args.fp32},
    })
    splits = make_splits("cifar10", seed=0, limit_train=args.images, limit_test=256)
    torch.manual_seed(0)
    model_t = build_model(cfg, splits).to(dev)
    model_b = build_model(cfg, splits).to(dev)
    model_b.load_state_dict(model_t.state_dict())
    stack = DefenseStack([create_defense("noise", sigma=args.noise)] if args.noise else [])
    trainer = Trainer(model_t, stack, splits, cfg.train, device=dev, seed=0, progress=False,
                      augment=False)

    # the bare loop: same batches, pre-materialised on the device
    batches = list(BatchLoader(splits.train, batch_size=args.batch_size, shuffle=True,
                               augment=False, device=dev, seed=0, drop_last=True))
    opt = torch.optim.SGD(model_b.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    fast = not args.fp32
    if fast:
        model_b.to(memory_format=torch.channels_last)
        batches = [(x.contiguous(memory_format=torch.channels_last), y) for x, y in batches]
    autocast = lambda: torch.autocast(dev.type, dtype=torch.bfloat16, enabled=fast)  # noqa: E731
    n_img = sum(int(y.numel()) for _, y in batches)

    def sync() -> None:
        if dev.type == "cuda":
            torch.cuda.synchronize()

    def bare_epoch() -> float:
        model_b.train()
        sync()
        t0 = time.perf_counter()
        for x, y in batches:
            with autocast():
                z = model_b.client(x).float()
            if args.noise:
                z = z + args.noise * torch.randn_like(z)
            with autocast():
                logits = model_b.server(z)
            loss = F.cross_entropy(logits.float(), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        sync()
        return n_img / (time.perf_counter() - t0)

    def trainer_epoch() -> float:
        sync()
        t0 = time.perf_counter()
        trainer.train_epoch()  # includes the epoch-end hooks
        trainer.epoch += 1
        sync()
        return n_img / (time.perf_counter() - t0)

    bare_epoch()  # warm-up both (allocator, kernels)
    trainer_epoch()
    t_ips, b_ips = [], []
    for _ in range(args.repeats):
        t_ips.append(trainer_epoch())
        b_ips.append(bare_epoch())
        print(f"trainer {t_ips[-1]:8.1f} img/s   bare {b_ips[-1]:8.1f} img/s", flush=True)
    t, b = statistics.median(t_ips), statistics.median(b_ips)
    print(json.dumps({
        "trainer_images_per_s": round(t, 1),
        "bare_images_per_s": round(b, 1),
        "ratio_trainer_over_bare": round(t / b, 3),
        "device": str(dev),
        "bf16_channels_last": fast,
        "images_per_epoch": n_img,
    }))


if __name__ == "__main__":
    main()
