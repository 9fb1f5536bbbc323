"""The embedded default job: what do noise, and noise + CEM, buy against model inversion?

Trains three split models at CPU size (undefended; Gaussian noise sigma 0.1; the same noise
with CEM), attacks each with the decoder attack, and prints the comparison (accuracy, MSE,
SSIM, PSNR); ``comparison.png`` shows it as bars. Everything is sized to finish in a few
minutes on two CPU cores; on a GPU it is faster still.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from splitcem._io import atomic_write
from splitcem.config import load_config
from splitcem.study.sweep import run_sweep

__all__ = ["DEMO_CEM_LAMBDA", "DEMO_CONFIG", "demo_configs", "plot_comparison", "run_demo"]

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

#: CEM's weight in the demo. CEM acts from the second epoch (the mixture is first fitted at the
#: end of the first), so on the demo's two epochs it needs a larger lambda than the CPU
#: protocol (3 there): measured with one thread, lambda 1, 3, 10, 30 raised the attack's MSE
#: over noise alone by 6%, 5%, 14%, 25% (see "The demo's lambda" in docs/cem.md).
DEMO_CEM_LAMBDA = 30.0

NOISE_SIGMA = 0.1


def demo_configs(dataset: str = "fashion_mnist", root: str | None = None) -> list[dict[str, Any]]:
    """The demo's three runs: no defense; noise sigma 0.1 (with CEM's estimates only); the
    same noise with CEM at :data:`DEMO_CEM_LAMBDA`."""
    base = {**DEMO_CONFIG, "data": {**DEMO_CONFIG["data"], "name": dataset, "root": root}}
    noise = [{"name": "noise", "sigma": NOISE_SIGMA}]
    plain = {**base, "name": "undefended"}
    noisy = {**base, "name": f"noise_{NOISE_SIGMA}", "defenses": noise, "cem": {"lambda": 0.0}}
    cem = {**base, "name": f"noise_{NOISE_SIGMA}_cem_{DEMO_CEM_LAMBDA:g}", "defenses": noise,
           "cem": {"lambda": DEMO_CEM_LAMBDA}}
    return [plain, noisy, cem]


def _metric(rec: dict[str, Any], name: str) -> float:
    for r in ((rec.get("attacks") or {}).get("attacks") or {}).values():
        m = r.get("metrics", r)
        if m.get(name) is not None:
            return float(m[name])
    return float("nan")


def plot_comparison(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Bars, one row per run: test accuracy, attack MSE (with the change against the first
    run) and SSIM, each panel saying which way is better."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = [str(r.get("name")) for r in records]
    acc = [100 * (r.get("train") or {}).get("test_accuracy", float("nan")) for r in records]
    mse = [_metric(r, "mse") for r in records]
    ssim = [_metric(r, "ssim") for r in records]
    fig = Figure(figsize=(11, 1.0 + 0.7 * len(records)))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3, sharey=True)
    colors = ["#7f7f7f", "#1f77b4", "#d62728", "#2ca02c", "#9467bd"]
    rows = list(range(len(records)))[::-1]  # first run on top
    panels = (
        (axes[0], acc, "test accuracy (%)\nhigher = more useful", "{:.1f}%"),
        (axes[1], mse, "attack MSE\nhigher = more private", "{:.4f}"),
        (axes[2], ssim, "attack SSIM\nlower = more private", "{:.3f}"),
    )
    for ax, vals, title, fmt in panels:
        ax.barh(rows, vals, color=[colors[i % len(colors)] for i in range(len(vals))])
        top = max((v for v in vals if v == v), default=1.0)
        for y, v, i in zip(rows, vals, range(len(vals)), strict=True):
            label = fmt.format(v)
            if ax is axes[1] and i and mse[0] == mse[0] and mse[0] > 0:
                label += f" ({100 * (v / mse[0] - 1):+.0f}%)"
            if ax is axes[0]:  # percent: the axis ends at 100, the label sits in the bar
                ax.text(v - 2, y, label, va="center", ha="right", fontsize=10, color="white")
            else:
                ax.text(v + 0.02 * top, y, label, va="center", fontsize=10)
        ax.set_xlim(0, 100 if ax is axes[0] else 1.45 * top)
        ax.set_title(title, fontsize=11)
        ax.tick_params(axis="x", labelsize=9)
        ax.grid(axis="x", alpha=0.3)
    axes[0].set_yticks(rows, names, fontsize=10)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))


def run_demo(
    *,
    dataset: str = "fashion_mnist",
    root: str | None = None,
    out: str | Path = "runs/demo",
    progress: bool = True,
    device: str | torch.device | None = None,
    overrides: Sequence[str] = (),
) -> str:
    """Run the demo into ``out``; returns the comparison table (markdown) and writes
    ``comparison.md``, ``comparison.png`` and each run's directory there.

    ``overrides`` (``key.sub=value``) apply to every run, e.g. a smaller size for a test.
    """
    import yaml

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for cfg in demo_configs(dataset, root):
        load_config(cfg, list(overrides))  # validate before writing
        p = out / f"{cfg['name']}.yaml"
        p.write_text(yaml.safe_dump(cfg, sort_keys=False))
        paths.append(p)
    table = run_sweep(paths, out, overrides=overrides, baseline="undefended",
                      progress=progress, device=None if device is None else str(device))
    records = json.loads((out / "comparison.json").read_text())
    plot_comparison(records, out / "comparison.png")
    return table
