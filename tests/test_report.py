"""Figures are drawn without pyplot: the caller's matplotlib backend and figures are left
alone (a notebook user keeps theirs)."""

from __future__ import annotations

import sys

import matplotlib
import torch
from PIL import Image

from splitcem.report import plot_frontier, save_image_grid


def _record(name: str, acc: float, mse: float) -> dict:
    return {"name": name, "train": {"test_accuracy": acc},
            "attacks": {"attacks": {"decoder": {"metrics": {"mse": mse, "ssim": 0.5,
                                                            "psnr": 20.0}}}}}


def test_figures_leave_the_backend_and_pyplot_alone(tmp_path):
    before = matplotlib.get_backend()
    had_pyplot = "matplotlib.pyplot" in sys.modules
    rows = {"original": torch.rand(5, 3, 8, 8), "decoder": torch.rand(5, 3, 8, 8)}
    grid = save_image_grid(rows, tmp_path / "grid.png", show=4)
    plot = plot_frontier([_record("a", 0.8, 0.01), _record("b", 0.7, 0.02)],
                         tmp_path / "frontier.png")
    for p in (grid, plot):
        with Image.open(p) as im:
            assert im.format == "PNG" and im.size[0] > 100 and im.size[1] > 100
    assert matplotlib.get_backend() == before
    if not had_pyplot:
        assert "matplotlib.pyplot" not in sys.modules
    else:  # nothing was left open in pyplot's figure registry
        import matplotlib.pyplot as plt

        assert not plt.get_fignums()
