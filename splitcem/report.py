"""Human-facing outputs of runs: summary.md, image grids, comparison tables and plots.

Everything here reads the results record (metrics.json) rather than live objects, so a
report can be re-made from any finished run directory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from splitcem._io import atomic_write, write_text

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from torch import Tensor

    from splitcem.config import RunConfig

__all__ = [
    "CurvePoint",
    "attack_metric",
    "attack_rows",
    "comparison_table",
    "leakage_cell",
    "markdown_table",
    "mean_sd",
    "plot_curves",
    "plot_frontier",
    "plot_panels",
    "save_image_grid",
    "save_reconstructions",
    "write_summary",
]

GRID_FILE = "reconstructions.png"
#: the grid's images as arrays (row names + uint8 (K, H, W, C) per row), for side-by-side
#: grids across runs without re-running them
RECON_FILE = "reconstructions.npz"
SUMMARY_FILE = "summary.md"


def _fmt(v: Any, digits: int = 4) -> str:
    if isinstance(v, float):
        if math.isnan(v):
            return "-"
        return f"{v:.{digits}f}"
    return "-" if v is None else str(v)


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The one markdown table writer: floats with 4 digits, ``-`` for missing / NaN."""
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_fmt(c) for c in r) + " |" for r in rows]
    return "\n".join(out)


def attack_rows(record: dict[str, Any]) -> list[tuple[str, float, float, float, float]]:
    """(attack, mse, ssim, psnr, seconds) per attack in a results record, worst case last."""
    att = record.get("attacks") or {}
    rows = []
    for name, r in (att.get("attacks") or {}).items():
        m = r.get("metrics", r)
        rows.append((name, m.get("mse"), m.get("ssim"), m.get("psnr"), r.get("seconds")))
    worst = att.get("worst") or {}
    if worst and len(rows) > 1:
        rows.append((
            "worst case",
            (worst.get("mse") or {}).get("value"),
            (worst.get("ssim") or {}).get("value"),
            (worst.get("psnr") or {}).get("value"),
            None,
        ))
    return rows


def write_summary(run_dir: str | Path, record: dict[str, Any], cfg: RunConfig) -> Path:
    """Write ``summary.md``: what was run, accuracy, attack table, CEM bounds, images."""
    run_dir = Path(run_dir)
    tr = record.get("train", {})
    lines = [
        f"# {record.get('name', cfg.name)}",
        "",
        f"- data: {cfg.data.name}; model: {cfg.model.arch} cut {cfg.model.cut}, "
        f"features {record.get('feature_shape')}, "
        f"{record.get('client_parameters', 0):,} client parameters",
        f"- defenses: {record.get('defenses', '-')}",
        f"- training: {tr.get('epochs', 0)} epochs in {_fmt(tr.get('seconds', float('nan')), 1)} s"
        f" on {record.get('device', '?')}",
    ]
    num = record.get("numerics") or {}
    if num:
        lines.append(f"- numerics: {num.get('path', '?')} ({num.get('reason', '?')}), "
                     f"{num.get('threads', '?')} CPU threads")
    made = record.get("made_by") or []
    if made:
        lines.append("- made by: " + "; ".join(
            f"{e.get('phase')} {(e.get('commit') or 'no git commit')[:12]}"
            f"{'+dirty' if str(e.get('commit')).endswith('+dirty') else ''} "
            f"(splitcem {e.get('splitcem')}, torch {e.get('torch')}, {e.get('cpu')}"
            f"{', ' + e['gpu'] if e.get('gpu') else ''}"
            f"{', bf16 ' + str(e['bf16']) if e.get('bf16') and num.get('amp') else ''}, "
            f"{e.get('at')})" for e in made))
    lines += [
        f"- **test accuracy (under the deployed defense): "
        f"{_fmt(100 * tr.get('test_accuracy', float('nan')), 2)}%**",
    ]
    cem = record.get("cem") or {}
    if cem:
        lines.append("- CEM estimates (last epoch): " + ", ".join(
            f"{k} = {_fmt(v)}" for k, v in cem.items() if isinstance(v, int | float)
        ))
    lk = leakage_cell(record)
    if lk != "-":
        lines.append(f"- I(x;z) upper bound, plug-in estimate (bits): {lk} (held-out: on test "
                     "features in eval mode; train: CEM's own fit; an estimate, not a guarantee)")
    rows = attack_rows(record)
    if rows:
        att = record.get("attacks") or {}
        threats = att.get("threats") or [att.get("threat") or {}]
        desc = "; ".join(", ".join(f"{k} {v}" for k, v in t.items() if v is not None)
                         for t in threats)
        lines += ["", f"## Model inversion attacks ({desc or 'default threat model'})", "",
                  markdown_table(["attack", "MSE", "SSIM", "PSNR (dB)", "seconds"], rows)]
        skipped = (record.get("attacks") or {}).get("skipped") or {}
        if skipped:
            lines += ["", "Skipped: " + "; ".join(f"{n} ({why})" for n, why in skipped.items())]
        if (run_dir / GRID_FILE).exists():
            lines += ["", f"![reconstructions]({GRID_FILE})",
                      "", "Top row: originals; below: one row per attack (with several threat "
                      "models, each group starts with its own originals)."]
    return write_text(run_dir / SUMMARY_FILE, "\n".join(lines) + "\n")


def _figure(figsize: tuple[float, float]) -> Figure:
    """A figure that draws to PNG without pyplot: no global backend switch (a notebook user
    keeps theirs), no figure registry to leak into, so nothing to close."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_image_grid(rows: dict[str, Tensor], path: str | Path, *, show: int = 8) -> Path:
    """Save labelled rows of [0, 1] images (each (N, C, H, W)) as one PNG."""
    names = list(rows)
    have = min(int(t.shape[0]) for t in rows.values())
    n = min(show, have)
    pick = np.linspace(0, have - 1, n).round().astype(int)  # spread over what was kept
    fig = _figure(figsize=(1.2 * n + 1.2, 1.3 * len(names)))
    axes = fig.subplots(len(names), n, squeeze=False)
    for r, name in enumerate(names):
        imgs = rows[name][pick.tolist()].detach().float().clamp(0, 1).cpu()
        for c in range(n):
            ax = axes[r][c]
            img = imgs[c].permute(1, 2, 0).numpy()
            ax.imshow(img.squeeze(-1) if img.shape[-1] == 1 else img,
                      cmap="gray" if img.shape[-1] == 1 else None, vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if c == 0:
                ax.set_ylabel(name, rotation=0, ha="right", va="center", fontsize=8)
    fig.tight_layout()

    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))


def save_reconstructions(run_dir: str | Path, attack_report: Any, *, show: int = 8) -> Path | None:
    """One grid for the run: originals on top, then each attack's reconstructions."""
    results = [r for r in getattr(attack_report, "results", {}).values() if
               getattr(r, "reconstructions", None) is not None and r.reconstructions.numel()]
    if not results:
        return None
    where = getattr(attack_report, "result_threat", {})
    several = len(set(where.values())) > 1
    rows: dict[str, Tensor] = {}
    group = None
    for r in results:  # one "original" row per threat model: each has its own held-out set
        if where.get(r.name) != group or not rows:
            group = where.get(r.name)
            rows[f"original@{group}" if several else "original"] = r.originals
        rows[r.name] = r.reconstructions
    save_image_arrays(rows, Path(run_dir) / RECON_FILE)
    return save_image_grid(rows, Path(run_dir) / GRID_FILE, show=show)


def save_image_arrays(rows: dict[str, Tensor], path: str | Path) -> Path:
    """Save labelled rows of [0, 1] images (N, C, H, W) as uint8 arrays in one ``.npz``."""
    arrays = {f"row{i}": (t.detach().float().clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
                          * 255).round().astype(np.uint8) for i, t in enumerate(rows.values())}
    names = np.array(list(rows), dtype=str)

    def _save(p: Path) -> None:
        with open(p, "wb") as f:
            save: Any = np.savez_compressed  # its typed signature mistakes **arrays
            save(f, names=names, **arrays)

    return atomic_write(path, _save)


def load_image_arrays(path: str | Path) -> dict[str, np.ndarray]:
    """Rows saved by :func:`save_image_arrays`: name -> uint8 (N, H, W, C)."""
    with np.load(path) as z:
        return {str(n): z[f"row{i}"] for i, n in enumerate(z["names"])}


def comparison_table(records: Sequence[dict[str, Any]], *, baseline: str | None = None) -> str:
    """Markdown table comparing runs: accuracy and the worst-case attack metrics.

    With ``baseline`` (a run name), adds the MSE change relative to it in percent.
    """
    base_mse = None
    if baseline is not None:
        for rec in records:
            if rec.get("name") == baseline:
                base_mse = attack_metric(rec, "mse")
    header = ["run", "defenses", "test acc (%)", "MSE", "SSIM", "PSNR",
              "I(x;z) bound est. (bits)"]
    if base_mse:
        header.append("MSE vs baseline")
    rows = []
    for rec in records:
        mse = attack_metric(rec, "mse")
        row = [
            rec.get("name"), rec.get("defenses", "-"),
            100 * (rec.get("train") or {}).get("test_accuracy", float("nan")),
            mse, attack_metric(rec, "ssim"), attack_metric(rec, "psnr"),
            leakage_cell(rec),
        ]
        if base_mse:
            row.append(f"{100 * (mse / base_mse - 1):+.1f}%" if mse == mse else "-")
        rows.append(row)
    return markdown_table(header, rows)


def leakage_cell(rec: dict[str, Any]) -> str:
    """The run's I(x; z) bound estimate for a table: the held-out plug-in figure if there is
    one, else CEM's training-time figure marked ``(train)``, or ``n/a (why)``."""
    lk = rec.get("leakage") or {}
    if lk.get("heldout_bits") is not None:
        return f"{lk['heldout_bits']:.0f} (held-out)"
    why = rec.get("leakage_note") or lk.get("note")
    if why:
        return f"n/a ({why})"
    mi = (rec.get("cem") or {}).get("mi_bound_bits")
    return f"{mi:.0f} (train)" if isinstance(mi, int | float) else "-"


def attack_metric(rec: dict[str, Any], metric: str) -> float:
    """The worst case for the defender if several attacks ran, else the only attack's value."""
    att = rec.get("attacks") or {}
    worst = (att.get("worst") or {}).get(metric)
    if worst and worst.get("value") is not None:
        return float(worst["value"])
    for r in (att.get("attacks") or {}).values():
        m = r.get("metrics", r)
        if m.get(metric) is not None:
            return float(m[metric])
    return float("nan")


@dataclass(frozen=True)
class CurvePoint:
    """One point of a frontier curve: a setting's seed means and sds (accuracy in [0, 1])."""

    label: str | None
    accuracy: float
    accuracy_sd: float
    mse: float
    mse_sd: float
    ssim: float
    ssim_sd: float

    @classmethod
    def of(cls, label: str | None, accuracy: Sequence[float], mse: Sequence[float],
           ssim: Sequence[float]) -> CurvePoint:
        """A setting's point from its seeds' values (:func:`mean_sd` of each)."""
        return cls(label, *mean_sd(accuracy), *mean_sd(mse), *mean_sd(ssim))


def mean_sd(xs: Sequence[float | None]) -> tuple[float, float]:
    """Mean and sample sd of the finite values in ``xs`` (sd 0 for one value; both NaN for
    none)."""
    a = np.asarray([x for x in xs if x is not None and not math.isnan(x)], dtype=float)
    if not len(a):
        return float("nan"), float("nan")
    return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _draw(ax: Any, metric: str, points: Sequence[CurvePoint], *, color: Any, marker: str,
          baseline: bool, label: str) -> None:
    """One series on ``ax``: test accuracy (%) against ``metric``, mean ± sd error bars,
    points annotated with their labels; a baseline solid and thicker, others dashed."""
    xs = [getattr(p, metric) for p in points]
    ys = [100 * p.accuracy for p in points]
    ax.errorbar(xs, ys, xerr=[getattr(p, f"{metric}_sd") for p in points],
                yerr=[100 * p.accuracy_sd for p in points],
                fmt=marker + ("-" if baseline else "--"), color=color, capsize=3,
                lw=2 if baseline else 1.2, label=label)
    for x, y, p in zip(xs, ys, points, strict=True):
        if p.label is not None:
            ax.annotate(p.label, (x, y), fontsize=7, xytext=(4, 3),
                        textcoords="offset points", color=color)


_MSE_AXIS = "worst-case attack MSE (higher = more private)"


def plot_curves(series: dict[str, list[CurvePoint]], path: str | Path, *,
                baseline: str | None = None, title: str | None = None) -> Path:
    """The one frontier plot: test accuracy against worst-case attack MSE (left) and SSIM
    (right), one curve per series (mean ± sd over seeds, points labelled by strength); the
    baseline drawn solid and black; ``title``, if given, a second line under the heading (the
    demo puts its verdict there). Every other series has a colour of its own (tab10, or tab20
    past ten series; past twenty the marker changes too); the legend sits under the axes, so
    it hides no point. Used by ``splitcem frontier``, ``sweep``, ``reproduce`` and the demo."""
    from matplotlib import colormaps

    n = len(series)
    ncol = min(3, max(n, 1))
    rows = -(-n // ncol)  # legend rows under the axes
    legend_in = 0.18 * rows + 0.2  # inches
    fig = _figure(figsize=(12, 5 + legend_in))
    axes = fig.subplots(1, 2)
    others = sorted(g for g in series if g != baseline)
    cmap = colormaps["tab10" if len(others) <= 10 else "tab20"]
    for g, points in sorted(series.items()):
        gi = others.index(g) if g != baseline else 0
        color = "black" if g == baseline else cmap(gi % cmap.N)
        marker = "o" if g == baseline else "osD^v"[(gi // cmap.N) % 5]
        for ax, metric in zip(axes, ("mse", "ssim"), strict=True):
            _draw(ax, metric, points, color=color, marker=marker, baseline=g == baseline,
                  label=g + (" (baseline)" if g == baseline else ""))
    axes[0].set_xlabel(_MSE_AXIS)
    axes[1].set_xlabel("worst-case attack SSIM (lower = more private)")
    for ax in axes:
        ax.set_ylabel("test accuracy (%)")
        ax.grid(alpha=0.3)
    handles, labels = axes[0].get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
    head = "privacy-utility frontier (mean ± sd over seeds; labels: strength)"
    fig.suptitle(head if not title else f"{head}\n{title}")
    fig.tight_layout(rect=(0.0, legend_in / (5 + legend_in), 1.0, 1.0))
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=110))


def plot_panels(panels: dict[str, dict[str, list[CurvePoint]]], path: str | Path, *,
                baseline: str, title: str, ncols: int = 3) -> Path:
    """Small multiples: one axes per panel (titled by its key), test accuracy against
    worst-case attack MSE, each with its own series (mean ± sd over seeds, points labelled)
    and legend. In every panel the series named ``baseline`` is drawn solid and black and
    the others take tab10's colours in their order, so the n-th series of each panel has one
    colour; all axes share their scales, so panels compare at a glance. ``splitcem
    reproduce``'s ``defenses.png``: each defense without and with CEM against noise alone."""
    from matplotlib import colormaps

    if not panels:
        raise ValueError("plot_panels: no panels to draw")
    ncols = max(1, min(ncols, len(panels)))
    nrows = -(-len(panels) // ncols)
    fig = _figure(figsize=(4.6 * ncols, 3.7 * nrows + 0.5))
    axes = fig.subplots(nrows, ncols, squeeze=False, sharex=True, sharey=True).ravel()
    cmap = colormaps["tab10"]
    for ax, (name, series) in zip(axes, panels.items(), strict=False):
        others = [g for g in series if g != baseline]
        for g, points in series.items():
            color = "black" if g == baseline else cmap(others.index(g) % cmap.N)
            _draw(ax, "mse", points, color=color, marker="o", baseline=g == baseline, label=g)
        ax.set_title(name, fontsize=10)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6, loc="best", framealpha=0.8)
    n = len(panels)
    for i, ax in enumerate(axes[:n]):
        if i + ncols >= n:  # the lowest panel of its column: its x axis labelled
            ax.set_xlabel(_MSE_AXIS, fontsize=8)
            ax.tick_params(labelbottom=True)
        if i % ncols == 0:
            ax.set_ylabel("test accuracy (%)")
    for ax in axes[n:]:
        ax.set_visible(False)
    fig.suptitle(title)
    fig.tight_layout()
    return atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=100))


def plot_frontier(records: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """:func:`plot_curves` of single runs: one point per run (up and right is better)."""
    series = {str(r.get("name")): [CurvePoint(
        None, float((r.get("train") or {}).get("test_accuracy", float("nan"))), 0.0,
        attack_metric(r, "mse"), 0.0, attack_metric(r, "ssim"), 0.0)] for r in records}
    return plot_curves(series, path)
