"""examples/byo_cifar10.py through splitcem's YAML path, for comparison: the user's CNN is
registered as a model, then examples/byo_cifar10.yaml runs as any bundled config does.

    python examples/byo_cifar10_yaml.py          # the full setting (a few minutes, one thread)
    python examples/byo_cifar10_yaml.py --tiny   # a smoke run in seconds (what CI runs)

A package would register the model through the ``splitcem.models`` entry point instead, and
``splitcem run examples/byo_cifar10.yaml`` would then work from the command line.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

import splitcem
from splitcem.models import register_model

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from byo_cifar10 import TINY, tiny_requested  # noqa: E402
from small_cnn import SmallCNN  # noqa: E402


@register_model("small_cnn")
def small_cnn(*, num_classes: int = 10, in_channels: int = 3) -> SmallCNN:
    """The small CIFAR-10 CNN of examples/small_cnn.py (cut it by name: features.9)."""
    return SmallCNN(num_classes=num_classes, in_channels=in_channels)


def main(argv: list[str] | None = None) -> dict[str, float]:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="smoke-test size (also env "
                    "SPLITCEM_EXAMPLES_TINY=1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--root", default=None, help="CIFAR-10 location (default: search)")
    ap.add_argument("--out", default="runs/byo_cifar10_yaml", help="run directory")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    overrides = [f"seed={args.seed}"]
    if args.root:
        overrides.append(f"data.root={args.root}")
    if tiny_requested(args.tiny):
        a = TINY["attack"]
        overrides += [f"data.limit_train={TINY['limit_train']}",
                      f"data.limit_test={TINY['limit_test']}",
                      f"train.epochs={TINY['epochs']}", f"train.eval_every={TINY['epochs']}",
                      f"attack.attacks.0.epochs={a['epochs']}",
                      f"attack.attacks.0.width={a['width']}",
                      f"attack.attacks.0.depth={a['depth']}"]
    cfg = splitcem.load_config(HERE / "byo_cifar10.yaml", overrides)
    record = splitcem.run_experiment(cfg, args.out, overwrite=True, progress=False)
    worst = record["attacks"]["worst"]
    result = {"test_accuracy": record["train"]["test_accuracy"],
              "attack_mse": worst["mse"]["value"], "attack_ssim": worst["ssim"]["value"],
              "attack_psnr_db": worst["psnr"]["value"],
              "train_s": round(record["train"]["seconds"], 1), "seed": args.seed}
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
