"""The embedded default job: is noise worth anything against a model inversion attack?

Trains an undefended and a noise-defended split model at CPU size, attacks both with the
decoder attack, and prints the comparison (accuracy, MSE, SSIM, PSNR). Everything is sized
to finish in a few minutes on two CPU cores; on a GPU it is faster still.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from splitcem.config import load_config
from splitcem.sweep import run_sweep

__all__ = ["DEMO_CONFIG", "demo_configs", "run_demo"]

#: CPU-sized: the paper's client layout (VGG11-BN cut 4, C8S1 bottleneck, sigmoid) at half
#: width, a quarter-width server, 20,000 training images and 2 epochs; the attacker learns
#: from 90% of the full test set. Sized to finish in a few minutes on two CPU cores.
DEMO_CONFIG: dict[str, Any] = {
    "name": "demo",
    "seed": 125,
    "data": {"name": "fashion_mnist", "limit_train": 20000,
             "augment": {"crop_pad": 2, "flip": True, "rotation": 0.0}},
    "model": {"arch": "vgg11_bn", "cut": 4, "bottleneck_channels": 8, "activation": "sigmoid",
              "client_width": 0.5, "server_width": 0.25},
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.05, "warmup_epochs": 1,
              "schedule": "cosine"},
    "attack": {"threat": "inference",
               "attacks": [{"name": "decoder", "epochs": 8, "width": 32, "depth": 2}]},
}


def demo_configs(dataset: str = "fashion_mnist", root: str | None = None) -> list[dict[str, Any]]:
    """The demo's two runs: no defense, and Gaussian noise sigma = 0.1 (with CEM's estimates)."""
    base = {**DEMO_CONFIG, "data": {**DEMO_CONFIG["data"], "name": dataset, "root": root}}
    plain = {**base, "name": "undefended"}
    noisy = {**base, "name": "noise_0.1", "defenses": [{"name": "noise", "sigma": 0.1}],
             "cem": {"lambda": 0.0}}
    return [plain, noisy]


def run_demo(
    *,
    dataset: str = "fashion_mnist",
    root: str | None = None,
    out: str | Path = "runs/demo",
    progress: bool = True,
    device: str | torch.device | None = None,
) -> str:
    """Run the demo into ``out``; returns the comparison table (markdown)."""
    import yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for cfg in demo_configs(dataset, root):
        load_config(cfg)  # validate before writing
        p = out / f"{cfg['name']}.yaml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        paths.append(p)
    return run_sweep(paths, out, baseline="undefended", progress=progress, device=device)
