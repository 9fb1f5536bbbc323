"""Bring your own model and loop: a plain PyTorch CNN, Adam and a cosine schedule on
CIFAR-10, cut in two with splitcem.split, protected with Gaussian noise + CEM (three added
lines, marked ###), audited with the decoder inversion attack, and exported for serving.

    python examples/byo_cifar10.py               # 5,000 training images, 6 epochs, one thread
    python examples/byo_cifar10.py --defense none   # the same model without protection
    python examples/byo_cifar10.py --tiny        # a smoke run in seconds (what CI runs)

Then, from other shells: ``splitcem serve OUT`` and ``splitcem infer OUT IMAGE --url URL``
(``--onnx`` here writes the edge client too, for ``splitcem infer --onnx``), and
``splitcem lens OUT --url URL`` with the audit's decoder.

The same run through splitcem's YAML path: examples/byo_cifar10_yaml.py. Both print one
JSON line last: {"test_accuracy": ..., "attack_mse": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

import splitcem
from splitcem.data import ArrayDataset, make_splits

sys.path.insert(0, str(Path(__file__).resolve().parent))
from small_cnn import SmallCNN  # the user's model, beside this file

#: the setting shared with byo_cifar10.yaml (the YAML path), and its tiny version for CI
SETTING: dict[str, Any] = {
    "limit_train": 5000, "limit_test": 2000, "epochs": 6, "batch_size": 128, "lr": 1e-3,
    "sigma": 0.1, "cem_lambda": 0.5, "cut": "features.9",
    "attack": {"name": "decoder", "epochs": 10, "width": 32, "depth": 2}}
TINY: dict[str, Any] = {"limit_train": 256, "limit_test": 128, "epochs": 2,
                        "attack": {"name": "decoder", "epochs": 1, "width": 8, "depth": 1}}


def tiny_requested(argv_flag: bool) -> bool:
    """--tiny, or SPLITCEM_EXAMPLES_TINY=1 in the environment (CI)."""
    return argv_flag or os.environ.get("SPLITCEM_EXAMPLES_TINY", "") in ("1", "true", "yes")


def as_tensors(ds: ArrayDataset) -> tuple[Tensor, Tensor]:
    """uint8 (N, H, W, C) arrays -> float images in [0, 1] (N, C, H, W) and int64 labels."""
    return torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 255, torch.from_numpy(
        ds.labels)


@torch.no_grad()
def accuracy(client: nn.Module, server: nn.Module, x: Tensor, y: Tensor) -> float:
    """Test accuracy of the deployed pipeline (the client's noise included)."""
    client.eval()
    server.eval()
    hits = sum(int((server(client(xb)).argmax(1) == yb).sum())
               for xb, yb in zip(x.split(500), y.split(500), strict=True))
    return hits / len(y)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke-test size (also env "
                    "SPLITCEM_EXAMPLES_TINY=1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=None, help="CIFAR-10 location (default: search)")
    ap.add_argument("--out", default="runs/byo_cifar10", help="audit report directory")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--defense", choices=("noise_cem", "none"), default="noise_cem",
                    help="noise 0.1 + CEM (default), or no protection (the baseline)")
    ap.add_argument("--onnx", action="store_true", help="also export the edge client")
    args = ap.parse_args(argv)
    s = {**SETTING, **(TINY if tiny_requested(args.tiny) else {})}
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    # ---- the user's data (any tensors do; these are the images the YAML run picks) -----
    splits = make_splits("cifar10", root=args.root, seed=args.seed,
                         limit_train=s["limit_train"], limit_test=s["limit_test"])
    info = splits.train.info
    mean, std = torch.tensor(info.mean).view(1, 3, 1, 1), torch.tensor(info.std).view(1, 3, 1, 1)
    train_x, train_y = as_tensors(splits.train)
    test_x, test_y = as_tensors(splits.test)
    loader = DataLoader(TensorDataset((train_x - mean) / std, train_y),
                        batch_size=s["batch_size"], shuffle=True, drop_last=True,
                        generator=torch.Generator().manual_seed(args.seed))

    # ---- the user's model, cut where the client should stop ----------------------------
    model = SmallCNN(num_classes=10)
    real_batch = (train_x[:16] - mean) / std  # a real batch: the cut is checked on it
    encoder, server = splitcem.split(model, at=s["cut"], example=real_batch)
    noise, cem = (([{"name": "noise", "sigma": s["sigma"]}], {"lambda": s["cem_lambda"]})
                  if args.defense == "noise_cem" else ([], None))
    client = splitcem.protect(encoder, noise, cem=cem, num_classes=10, mean=info.mean,  ### 1
                              std=info.std)
    opt = torch.optim.Adam([*client.parameters(), *server.parameters()], lr=s["lr"])
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=s["epochs"] * len(loader))

    # ---- the user's own training loop --------------------------------------------------
    t0 = time.perf_counter()
    for epoch in range(s["epochs"]):
        client.train()
        server.train()
        for x, y in loader:
            logits = server(client(x))
            loss = F.cross_entropy(logits, y) + client.loss(y)  ### 2
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
        stats = client.epoch_end()  ### 3
        print(f"epoch {epoch + 1}: loss {loss.item():.3f}, I(x;z) bound "
              f"{stats.get('cem/mi_bound_bits', float('nan')):.0f} bits", flush=True)
    train_s = time.perf_counter() - t0
    acc = accuracy(client, server, (test_x - mean) / std, test_y)

    # ---- what can a curious server reconstruct? ----------------------------------------
    report = splitcem.audit(client, (test_x, test_y), attacks=[s["attack"]], mean=info.mean,
                            std=info.std, seed=args.seed, out=args.out, progress=False)
    print(report.table())
    worst = report.worst

    # ---- deploy: OUT/deploy for splitcem serve / infer / lens ---------------------------
    splitcem.export(client, server, args.out, example=test_x[:8], classes=info.classes,
                    onnx=args.onnx)
    result = {"defense": args.defense, "test_accuracy": acc,
              "attack_mse": worst["mse"]["value"], "scored_images": worst["mse"]["images"],
              "attack_mse_ci95": worst["mse"].get("ci95"),
              "attack_ssim": worst["ssim"]["value"], "attack_psnr_db": worst["psnr"]["value"],
              "train_s": round(train_s, 1), "seed": args.seed}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
