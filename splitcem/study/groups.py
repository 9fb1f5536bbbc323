"""Runs as the frontier sees them: finished runs found through the run record, grouped by
defense family and context.

Families (a *group* is a family in one context, see below):

* ``noise``: Gaussian noise alone, over sigma;
* ``noise(sigma=S) + cem``: noise plus CEM (lambda > 0), over lambda; any defense with CEM
  likewise, over lambda, with the defenses' strengths fixed in the label;
* ``D + noise(sigma=S)``: a zoo defense D over its strength (``Defense.strength_param``);
* ``cut``: no defense at all, over ``model.cut`` (a deeper split point is a free defense).

Everything else in the config (data, model, training, attacks, CEM's other settings for a
CEM family) is the group's *context*; runs in different contexts are never pooled, and
their labels say what differs. Runs with the same config up to name and device (e.g. a copy
made by ``splitcem sweep --adopt``) are counted once.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from splitcem.config import RunConfig
from splitcem.record import RunRecord, comparable
from splitcem.report import attack_metric
from splitcem.runid import resolved_attacks
from splitcem.study.grid import format_value

__all__ = ["FrontierRun", "as_ran", "family", "find_runs", "group_runs", "seed_cells"]

#: config keys that neither change a run's results nor its group
_NOT_CONTEXT = {("name",), ("seed",), ("device",), ("data", "root"), ("data", "cache_dir"),
                ("train", "tensorboard"), ("defenses",), ("cem",),
                ("attack", "leakage")}  # the held-out I(x; z) estimate: no attack's figure


@dataclass
class FrontierRun:
    """One finished run, as the frontier sees it."""

    path: Path
    cfg: RunConfig
    record: dict[str, Any]
    family: str = ""
    strength_key: str = ""
    strength: float | None = None
    context: str = ""
    group: str = ""
    leakage_bits: float | None = None
    #: the aux / eval partition its attacks ran on (:attr:`splitcem.record.RunRecord.split`)
    split: dict[str, Any] | None = None
    #: the numeric path it trained on (:attr:`splitcem.record.RunRecord.numerics`)
    numerics: dict[str, Any] | None = None
    #: whether each attack ran bf16 (:attr:`splitcem.record.RunRecord.attack_amps`)
    attack_amps: dict[str, bool] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.cfg.name

    @property
    def accuracy(self) -> float:
        return float((self.record.get("train") or {}).get("test_accuracy", float("nan")))

    def metric(self, m: str) -> float:
        return attack_metric(self.record, m)


def find_runs(dirs: Sequence[str | Path]) -> tuple[list[FrontierRun], list[str]]:
    """Finished runs under ``dirs`` (recursively), and a note per run left out and why."""
    runs: list[FrontierRun] = []
    notes: list[str] = []
    seen: dict[str, Path] = {}
    for rec in RunRecord.find(dirs):
        why = rec.unfinished()
        if why is not None or rec.config is None:
            notes.append(f"{rec.path}: {why}")
            continue
        key = json.dumps(comparable(rec.config.to_dict()), sort_keys=True)
        if key in seen:
            notes.append(f"{rec.path}: same config as {seen[key]}, counted once")
            continue
        seen[key] = rec.path
        runs.append(FrontierRun(rec.path, rec.config, rec.metrics, split=rec.split,
                                numerics=rec.numerics, attack_amps=rec.attack_amps))
    return runs, notes


def _strength_param(name: str) -> str | None:
    from splitcem.defenses import DEFENSES

    if name not in DEFENSES:
        return None
    return getattr(DEFENSES.get(name), "strength_param", None)


def _param_value(spec: dict[str, Any], param: str | None) -> Any:
    """A defense's parameter from its config, else the registered factory's default."""
    import inspect

    from splitcem.defenses import DEFENSES

    if param is None:
        return None
    if param in spec:
        return spec[param]
    try:
        p = inspect.signature(DEFENSES.get(spec["name"])).parameters.get(param)
    except (ValueError, TypeError, KeyError):
        return None
    return None if p is None or p.default is inspect.Parameter.empty else p.default


def family(cfg: RunConfig) -> tuple[str, str, float | None]:
    """(family label, strength key, strength value) of a run's config."""
    defs = list(cfg.defenses)
    lam = cfg.cem.lam if cfg.cem is not None else 0.0

    def fixed(spec: dict[str, Any]) -> str:
        sp = _strength_param(spec["name"])
        v = _param_value(spec, sp)
        return f"{spec['name']}({sp}={format_value(v)})" if sp and v is not None else spec["name"]

    if lam > 0:
        label = " + ".join([fixed(s) for s in defs] + ["cem"])
        return label, "cem.lambda", float(lam)
    if not defs:
        return "cut", "model.cut", float(cfg.model.cut)
    primary = next((i for i, s in enumerate(defs) if s["name"] != "noise"), 0)
    sp = _strength_param(defs[primary]["name"])
    val = _param_value(defs[primary], sp)
    label = " + ".join(s["name"] if i == primary else fixed(s) for i, s in enumerate(defs))
    key = f"defenses.{primary}.{sp}" if sp else f"defenses.{primary}"
    return label, key, float(val) if isinstance(val, int | float) else None


def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: json.dumps(d, sort_keys=True)}


def _context(r: FrontierRun) -> dict[str, Any]:
    """What a run shares with the runs it is compared with: its config without its name,
    seed, paths and defense, with the numeric path as it ran (``amp: auto`` and ``amp: true``
    are one context where both ran bf16) rather than as it was asked for."""
    cfg, family = r.cfg, r.family
    d = as_ran(r)
    for path in _NOT_CONTEXT:
        cur = d
        for k in path[:-1]:
            cur = cur.get(k) or {}
        cur.pop(path[-1], None)
    if family == "cut":
        d["model"].pop("cut", None)
    if family.endswith("cem") and cfg.cem is not None:
        d["cem"] = {k: v for k, v in cfg.cem.model_dump(by_alias=True).items() if k != "lambda"}
    return d


def as_ran(r: FrontierRun) -> dict[str, Any]:
    """``r``'s config as a dict with its numeric path as it ran: training's ``amp`` /
    ``channels_last`` as recorded, each attack's ``amp`` as :func:`_attack_amp` finds it."""
    d = r.cfg.to_dict()
    num = r.numerics or {}
    if "amp" in num and "channels_last" in num:
        d["train"] = {**d["train"], "amp": bool(num["amp"]),
                      "channels_last": bool(num["channels_last"])}
    dev = str(num.get("device") or "cpu")
    d["attack"] = {**d["attack"], "attacks": [
        {**a, "amp": _attack_amp(r, a, dev)} for a in d["attack"].get("attacks") or []]}
    return d


def _attack_amp(r: FrontierRun, spec: dict[str, Any], device: str) -> bool:
    """Whether an attack of ``r`` ran bf16: as it recorded; else ``auto`` as it resolved
    where the run trained (``native_bf16`` recorded); else as ``spec`` resolves here."""
    label = spec.get("label", spec.get("name"))
    if label in r.attack_amps:
        return r.attack_amps[label]
    native = (r.numerics or {}).get("native_bf16")
    if spec.get("amp", "auto") == "auto" and native is not None:
        return bool(native)
    return bool(resolved_attacks([spec], device)[0]["amp"])


def group_runs(runs: list[FrontierRun]) -> dict[str, list[FrontierRun]]:
    """Set each run's family, strength, context and group label; return runs by group.

    Runs in the most common context get the family as their label; the others add what
    differs from it, and the settings that vary with those in other contexts, e.g.
    ``noise [model.bottleneck_channels=8, model.bottleneck_stride=2]`` beside
    ``noise [model.bottleneck_channels=16, model.bottleneck_stride=2]`` (8 is the
    default).
    """
    contexts: dict[str, dict[str, Any]] = {}
    counts: dict[str, int] = defaultdict(int)
    for r in runs:
        r.family, r.strength_key, r.strength = family(r.cfg)
        ctx = _context(r)
        r.context = json.dumps(ctx, sort_keys=True)
        contexts[r.context] = _flatten(ctx)
        counts[r.context] += 1
    main = contexts[max(counts, key=lambda c: (counts[c], c))] if counts else {}

    def attacks(flat: dict[str, Any]) -> str:
        return json.dumps({k: v for k, v in flat.items() if k.startswith("attack.")},
                          sort_keys=True)

    # each way of attacking other than the main context's is named, numbered if several
    other = sorted({attacks(f) for f in contexts.values()} - {attacks(main)})
    suite = {a: "other attacks" + (f" {i}" if len(other) > 1 else "")
             for i, a in enumerate(other, 1)}
    # a key differs if both have it and disagree (a CEM family's context has CEM's
    # settings, the others have none: that absence is not a difference)
    diffs = {c: frozenset(k for k in f if k in main and f[k] != main[k]
                          and not k.startswith("attack.")) for c, f in contexts.items()}
    groups: dict[str, list[FrontierRun]] = defaultdict(list)
    for r in runs:
        flat = contexts[r.context]
        parts = [f"{k}={_short(flat[k])}" for k in _shown(diffs[r.context], diffs, flat)]
        if attacks(flat) in suite:
            parts.append(suite[attacks(flat)])
        r.group = r.family + (f" [{', '.join(parts)}]" if parts else "")
        groups[r.group].append(r)
    return dict(groups)


def _shown(own: frozenset[str], diffs: dict[str, frozenset[str]], flat: dict[str, Any]
           ) -> list[str]:
    """The keys a context's label names: those it differs in from the main context, and
    those that vary with them elsewhere. A context that differs only in
    ``model.bottleneck_stride`` beside one that differs in it and in
    ``model.bottleneck_channels`` names both, so its label says its channel count too
    rather than leave the reader to know the default."""
    linked = set(own).union(*(d for d in diffs.values() if d & own))
    return sorted(k for k in linked if k in flat)


def seed_cells(runs: Sequence[FrontierRun], metric: str = "mse"
               ) -> tuple[dict[Any, dict[int, tuple[float, float]]], dict[Any, list[str]]]:
    """A group's cells keyed by seed, ``{strength: {seed: (accuracy, worst-case metric)}}``
    (what :func:`splitcem.study.frontier.compare` pairs on), and per strength a line per run
    left out (a second run of one seed in one cell: the first, in path order, is kept)."""
    cells: dict[Any, dict[int, tuple[float, float]]] = defaultdict(dict)
    kept: dict[tuple[Any, int], Path] = {}
    notes: dict[Any, list[str]] = defaultdict(list)
    for r in sorted(runs, key=lambda r: str(r.path)):
        key = (r.strength, r.cfg.seed)
        if key in kept:
            notes[r.strength].append(
                f"{r.path}: a second run of seed {r.cfg.seed} (the comparison keeps "
                f"{kept[key]})")
            continue
        kept[key] = r.path
        cells[r.strength][r.cfg.seed] = (r.accuracy, r.metric(metric))
    return dict(cells), dict(notes)


def _short(v: Any) -> str:
    s = json.loads(v) if isinstance(v, str) else v
    return format_value(s) if not isinstance(s, list | dict) else json.dumps(s)[:40]
