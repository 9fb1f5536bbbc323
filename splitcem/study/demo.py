"""The embedded default job: is noise + CEM more private than simply adding more noise?

A small frontier at CPU size, through the one engine (:func:`splitcem.study.trials.run_trials`):
Gaussian noise alone at :data:`DEMO_SIGMAS`, noise sigma 0.1 with CEM at
:data:`DEMO_CEM_LAMBDAS`, each on the same :data:`DEMO_SEEDS` (paired), and, on request, one
undefended run as a reference point. Every run is attacked with the decoder attack; the demo prints
each setting's accuracy and attack MSE / SSIM (seed means), then CEM against the noise-only
frontier at the same accuracy (:func:`splitcem.study.frontier.compare`): the gain in attack
MSE, its 95% interval and the verdict, or "undecided" with the seeds it would need.
``frontier.png`` shows the two curves (:func:`splitcem.report.plot_curves`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from splitcem._io import write_json, write_text
from splitcem.errors import SplitcemError
from splitcem.record import RunRecord
from splitcem.report import CurvePoint, attack_metric, markdown_table, plot_curves
from splitcem.study.frontier import Comparison, compare
from splitcem.study.grid import add_overrides, expand, format_value, load_sweep
from splitcem.study.trials import Engine, run_trials

__all__ = ["DEMO_CEM_LAMBDAS", "DEMO_CONFIG", "DEMO_SEEDS", "DEMO_SIGMAS", "demo_sweep",
           "run_demo"]

#: CPU-sized: the paper's client layout (VGG11-BN cut 4, C8S1 bottleneck, sigmoid) at half
#: width, a quarter-width server, 20,000 training images and 2 epochs; the attacker learns
#: from 90% of the full test set. No held-out I(x; z) estimate (the demo does not show it).
DEMO_CONFIG: dict[str, Any] = {
    "name": "demo",
    "seed": 125,
    "data": {"name": "fashion_mnist", "limit_train": 20000,
             "augment": {"crop_pad": 2, "flip": True, "rotation": 0.0}},
    "model": {"arch": "vgg11_bn", "cut": 4, "bottleneck_channels": 8, "activation": "sigmoid",
              "client_width": 0.5, "server_width": 0.25},
    "train": {"epochs": 2, "batch_size": 128, "lr": 0.05, "warmup_epochs": 1,
              "schedule": "cosine"},
    "attack": {"threat": "inference", "leakage": False,
               "attacks": [{"name": "decoder", "epochs": 8, "width": 32, "depth": 2}]},
}

#: noise alone: the baseline frontier (its least accurate point must lie below CEM's accuracy).
#: Measured in an 8-run demo with sigma 0.2 as well (seeds 125, 126): lambda 30's gain at
#: matched accuracy was +4.4% with 0.1 / 0.2 / 0.3 and +4.5% with 0.1 / 0.3, the interval
#: [-2.6%, +11.9%] and [-4.5%, +14.3%]: the third sigma narrowed it a little, for 2 more runs
#: of ~100 CPU-s that the demo's budget (under 10 minutes with set-up on 2 cores) lacks.
DEMO_SIGMAS: tuple[float, ...] = (0.1, 0.3)
#: CEM on noise sigma :data:`NOISE_SIGMA`. CEM acts from the second epoch (the mixture is first
#: fitted at the end of the first), so on two epochs it needs a larger lambda than the CPU
#: protocol (3 there); see "The demo's lambda" in docs/cem.md.
DEMO_CEM_LAMBDAS: tuple[float, ...] = (30.0,)
#: every noise and CEM setting runs these seeds (paired); the undefended run (optional) the first
DEMO_SEEDS: tuple[int, ...] = (125, 126)
NOISE_SIGMA = 0.1
UNDEFENDED, BASELINE, CEM = "undefended", "noise", f"noise(sigma={NOISE_SIGMA:g}) + cem"
#: a demo variant's name (up to its first placeholder) -> its group and the grid key it varies
_GROUPS = {"undefended": (UNDEFENDED, None), "noise": (BASELINE, "defenses.0.sigma"),
           f"noise{NOISE_SIGMA:g}_cem": (CEM, "cem.lambda")}
#: group -> setting (sigma, lambda; None for undefended) -> seed -> the run's metrics
Runs = dict[str, dict[Any, dict[int, dict[str, Any]]]]


def demo_sweep(dataset: str = "fashion_mnist", root: str | None = None, *,
               sigmas: Sequence[float] = DEMO_SIGMAS, lambdas: Sequence[float] = DEMO_CEM_LAMBDAS,
               seeds: Sequence[int] = DEMO_SEEDS, undefended: bool = False) -> dict[str, Any]:
    """The demo as a sweep file's dict (:mod:`splitcem.study.grid`): ``noise{sigma}_s{seed}``,
    ``noise0.1_cem{lambda}_s{seed}`` and, with ``undefended``, ``undefended_s{seed}`` (the
    first seed only: a reference point, not part of the comparison).

    A noise-only run has no ``cem`` section at all, so its defenses read ``noise(sigma=S)``.
    """
    base = {k: v for k, v in DEMO_CONFIG.items() if k not in ("name", "seed")}
    base["data"] = {**DEMO_CONFIG["data"], "name": dataset, "root": root}
    noise = [{"name": "noise", "sigma": NOISE_SIGMA}]
    return {
        "name": "demo", "set": base, "seeds": list(seeds),
        "variants": [
            *([{"name": "undefended", "seeds": list(seeds)[:1]}] if undefended else []),
            {"name": "noise{sigma}", "set": {"defenses": noise},
             "grid": {"defenses.0.sigma": [float(s) for s in sigmas]}},
            {"name": f"noise{format_value(NOISE_SIGMA)}_cem{{lambda}}",
             "set": {"defenses": noise, "cem": {"lambda": float(lambdas[0])}},
             "grid": {"cem.lambda": [float(v) for v in lambdas]}},
        ],
    }


def _use_ray(device: str | torch.device | None) -> bool:
    """Ray (two 1-thread trials beat one 2-thread trial, docs/sweeps.md) when it is installed
    and the trials run on the CPU; otherwise one trial after another here."""
    import importlib.util

    dev = torch.device(device) if device is not None else None
    return importlib.util.find_spec("ray") is not None and (dev is None or dev.type == "cpu")


def _pm(vals: Sequence[float] | np.ndarray, scale: float = 1.0, digits: int = 4) -> str:
    v = np.asarray(vals, dtype=float) * scale
    if len(v) < 2:
        return f"{v.mean():.{digits}f}"
    return f"{v.mean():.{digits}f} ± {v.std(ddof=1):.{digits}f}"


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:+.1f}%"


def describe(label: str, c: Comparison, seeds: Sequence[int]) -> str:
    """One comparison in words: gain, interval, verdict, the seeds it rests on."""
    head = f"{label}: accuracy {100 * c.accuracy:.2f}%, attack MSE {c.mse:.5f}"
    if c.gain is None:
        return f"{head}: {c.verdict} ({c.reason})"
    head += (f" against {c.baseline_mse:.5f} for noise alone at that accuracy: "
             f"gain {_pct(c.gain)}")
    if c.interval is not None:
        head += f" [{_pct(c.low)}, {_pct(c.high)}] ({round(100 * c.level)}% interval)"
    how = f"{'paired' if c.paired else 'unpaired'} over {c.n_seeds} seed(s), method {c.method}"
    line = (f"{head}\n  -> {c.verdict.upper()} ({c.reason}; {how}; seeds "
            f"{', '.join(map(str, seeds))})")
    if not c.decided:
        need = ("unknown at this spread" if c.seeds_needed is None
                else f"about {c.seeds_needed} more seed(s) at this spread")
        line += f"\n  -> deciding it would need {need}"
    for d in c.dropped:
        line += f"\n  (left out: {d})"
    return line


def run_demo(
    *,
    dataset: str = "fashion_mnist",
    root: str | None = None,
    out: str | Path = "runs/demo",
    progress: bool = True,
    device: str | torch.device | None = None,
    overrides: Sequence[str] = (),
    sigmas: Sequence[float] = DEMO_SIGMAS,
    lambdas: Sequence[float] = DEMO_CEM_LAMBDAS,
    seeds: Sequence[int] = DEMO_SEEDS,
    undefended: bool = False,
    use_ray: bool | None = None,
) -> str:
    """Run the demo's frontier into ``out`` (resumable: finished runs are kept); returns the
    report (markdown) and writes ``comparison.md``, ``comparison.json``, ``frontier.png`` and
    each run's directory (``NAME_s{seed}``, as a sweep names them) there.

    ``overrides`` (``key.sub=value``) apply to every run, e.g. a smaller size for a test;
    ``undefended`` adds one run without a defense as a reference point (about 100 CPU-s);
    ``use_ray``: ``None`` picks Ray when it is installed and the device is the CPU.
    """
    out = Path(out)
    dev = None if device is None else str(device)
    spec = add_overrides(load_sweep(demo_sweep(dataset, root, sigmas=sigmas, lambdas=lambdas,
                                               seeds=seeds, undefended=undefended)),
                         list(overrides))
    trials = expand(spec)  # every config validated before anything runs
    ray = _use_ray(device) if use_ray is None else use_ray
    engine = Engine(use_ray=ray, threads_per_trial=1 if ray else torch.get_num_threads(),
                    device=dev, progress=progress)
    res = run_trials(trials, out, name="demo", source="splitcem demo", engine=engine,
                     trial_progress=progress and not ray)
    runs: Runs = {UNDEFENDED: {}, BASELINE: {}, CEM: {}}
    for t in trials:
        rec = RunRecord.load(out / t.name)
        if rec.finished(t.cfg, device=dev):
            group, key = _GROUPS[t.variant.split("{")[0]]
            runs[group].setdefault(t.values.get(key) if key else None, {})[t.seed] = rec.metrics
    if not runs[BASELINE] or not runs[CEM]:
        failed = "; ".join(f"{n} ({res.statuses[n].get('error')})" for n in res.failed)
        raise SplitcemError("the demo needs finished noise-only and CEM runs; failed (see "
                            f"their trial.json): {failed or 'none'}")
    return _report(runs, out)


def _point(metrics: dict[str, Any]) -> tuple[float, float, float]:
    """(test accuracy, worst-case attack MSE, SSIM) of a run."""
    return (float((metrics.get("train") or {}).get("test_accuracy", float("nan"))),
            attack_metric(metrics, "mse"), attack_metric(metrics, "ssim"))


def _setting(group: str, key: Any) -> str:
    if group == UNDEFENDED:
        return "undefended"
    noise = f"noise {format_value(key if group == BASELINE else NOISE_SIGMA)}"
    return noise if group == BASELINE else f"{noise} + CEM lambda {format_value(key)}"


def _report(runs: Runs, out: Path) -> str:
    """The settings' table, CEM against the noise-only frontier, the plot and the JSON."""
    rows: list[list[Any]] = []
    series: dict[str, list[CurvePoint]] = {}
    cells: dict[str, dict[Any, dict[int, tuple[float, float]]]] = {}
    for group, settings in runs.items():
        series[group], cells[group] = [], {}
        for key in sorted(settings, key=lambda k: -1.0 if k is None else float(k)):
            by_seed = settings[key]
            pts = np.array([_point(by_seed[s]) for s in sorted(by_seed)])
            rows.append([_setting(group, key), next(iter(by_seed.values())).get("defenses", "-"),
                         ", ".join(map(str, sorted(by_seed))), _pm(pts[:, 0], 100, 2),
                         _pm(pts[:, 1], digits=5), _pm(pts[:, 2], digits=3)])
            mean = pts.mean(axis=0)
            sd = pts.std(axis=0, ddof=1) if len(pts) > 1 else np.zeros(3)
            series[group].append(CurvePoint(
                None if key is None else format_value(key), float(mean[0]), float(sd[0]),
                float(mean[1]), float(sd[1]), float(mean[2]), float(sd[2])))
            cells[group][key] = {s: (float(a), float(m)) for s, (a, m, _) in
                                 zip(sorted(by_seed), pts, strict=True)}
    if NOISE_SIGMA in runs[BASELINE]:  # the CEM curve starts at lambda 0: that noise alone
        start = series[BASELINE][sorted(runs[BASELINE]).index(NOISE_SIGMA)]
        series[CEM].insert(0, CurvePoint("0", start.accuracy, start.accuracy_sd, start.mse,
                                         start.mse_sd, start.ssim, start.ssim_sd))
    comps = {lam: compare(cells[BASELINE], cell) for lam, cell in cells[CEM].items()}
    lines = ["## Runs (mean ± sd over seeds; decoder attack, the same held-out images)", "",
             markdown_table(["setting", "defenses", "seeds", "test acc (%)", "attack MSE",
                             "attack SSIM"], rows), "",
             "## CEM against more noise, at matched accuracy", "",
             "gain = CEM's attack MSE / the noise-only frontier's at CEM's accuracy - 1 "
             "(higher MSE = more private)", ""]
    for lam, c in comps.items():
        lines += [describe(_setting(CEM, lam), c, sorted(cells[CEM][lam])), ""]
    text = "\n".join(lines).rstrip()
    write_text(out / "comparison.md", text + "\n")
    write_json(out / "comparison.json", {
        "settings": {_setting(g, k): {str(s): {"accuracy": a, "mse": m} for s, (a, m) in c.items()}
                     for g, cs in cells.items() for k, c in cs.items()},
        "comparisons": {_setting(CEM, lam): c.to_dict() for lam, c in comps.items()},
    })
    title = "; ".join(f"CEM lambda {format_value(lam)}: {_pct(c.gain)} MSE at matched accuracy, "
                      f"{c.verdict}" for lam, c in comps.items())
    plot_curves({g: pts for g, pts in series.items() if pts}, out / "frontier.png",
                baseline=BASELINE, title=title)
    return text
