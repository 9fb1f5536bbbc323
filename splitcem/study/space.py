"""A tune's search space: defense families, each a set of config keys that are constants or
ranges; read from a YAML file or made per defense family from the base config.

A space file::

    families:
      noise:                       # noise alone: CEM off (a point)
        set:
          defenses: [{name: noise, sigma: 0.1}]
          defenses.0.sigma: {low: 0.01, high: 1.0, log: true}
          cem.lambda: 0.0
      cem:                         # noise + CEM, both on log scales
        set:
          defenses: [{name: noise, sigma: 0.1}]
          defenses.0.sigma: {low: 0.01, high: 1.0, log: true}
          cem.lambda: {low: 0.3, high: 100.0, log: true}
    shared:                        # optional: searched in every family
      model.cut: {choices: [3, 4]}

A key is a dotted config path (as ``--set`` takes it), applied in file order; its value is a
constant, a range ``{low, high, log}`` (``int: true`` for integers) or ``{choices: [...]}``.
Every key and range is checked against the base config when the space is loaded: a bad one
is one :class:`~splitcem.errors.ConfigError`. The family named ``noise`` is the baseline a
recommendation is compared with.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from splitcem.config import RunConfig, load_config, set_path
from splitcem.errors import ConfigError

__all__ = ["Family", "Param", "SearchSpace", "default_space", "load_space"]

NOISE = "noise"
_TOP = {"families", "shared"}
_FAMILY = {"set"}
_RANGE = {"low", "high", "log", "int"}


@dataclass(frozen=True)
class Param:
    """One searched key: a range (``low``..``high``, log scale or not) or ``choices``."""

    key: str
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    choices: tuple[Any, ...] = ()

    def round(self, v: Any) -> Any:
        """A sampled value as the config gets it: 3 significant digits, inside the range."""
        if self.choices:
            return v
        assert self.low is not None and self.high is not None
        if self.integer:
            return int(min(max(round(float(v)), self.low), self.high))
        v = float(f"{float(v):.3g}")
        return min(max(v, self.low), self.high)

    def middle(self) -> Any:
        if self.choices:
            return self.choices[0]
        assert self.low is not None and self.high is not None
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        return self.round(mid)

    def contains(self, v: Any) -> bool:
        if self.choices:
            return v in self.choices
        assert self.low is not None and self.high is not None
        return isinstance(v, int | float) and self.low <= float(v) <= self.high


@dataclass(frozen=True)
class Family:
    """A defense family: constants and searched keys, applied in order."""

    name: str
    consts: dict[str, Any] = field(default_factory=dict)
    params: tuple[Param, ...] = ()
    order: tuple[str, ...] = ()


@dataclass(frozen=True)
class SearchSpace:
    """Families (the first key of every point: ``family``) and their parameters."""

    families: tuple[Family, ...]
    source: str = "(default)"

    def family(self, name: str) -> Family:
        for f in self.families:
            if f.name == name:
                return f
        raise ConfigError(f"no family {name!r} in the search space {self.source}")

    def label(self, family: str, values: Mapping[str, Any]) -> str:
        """A trial's directory stem: family and values, e.g. ``cem_sigma=0.1_lambda=3``."""
        parts = [family] + [f"{k.rsplit('.', 1)[-1]}={v:g}" if isinstance(v, float)
                            else f"{k.rsplit('.', 1)[-1]}={v}" for k, v in values.items()]
        return "_".join(parts)

    def config(self, base: Mapping[str, Any], family: str, values: Mapping[str, Any], *,
               name: str | None = None, seed: int | None = None) -> RunConfig:
        """The base config with one point of ``family`` applied."""
        fam = self.family(family)
        raw = copy.deepcopy(dict(base))
        if raw.get("cem") is None:
            raw["cem"] = {}
        for key in fam.order:
            set_path(raw, key, copy.deepcopy(values[key] if key in values
                                             else fam.consts[key]))
        if name is not None:
            raw["name"] = name
        if seed is not None:
            raw["seed"] = seed
        return load_config(raw)

    def point_of(self, cfg: RunConfig) -> tuple[str, dict[str, Any]] | None:
        """The family and values a run's config sits at, if it matches one family's
        constants and lies in its ranges (whether the rest matches is the caller's check)."""
        raw = cfg.to_dict()
        for fam in self.families:
            vals = {p.key: _get(raw, p.key) for p in fam.params}
            if not all(p.contains(vals[p.key]) for p in fam.params):
                continue
            try:
                same = self.config(raw, fam.name, vals).to_dict() == raw
            except ConfigError:
                same = False
            if same:
                return fam.name, vals
        return None


def _get(d: Any, dotted: str) -> Any:
    for k in dotted.split("."):
        if isinstance(d, list) and k.isdigit() and int(k) < len(d):
            d = d[int(k)]
        elif isinstance(d, dict) and k in d:
            d = d[k]
        else:
            return None
    return d


def _param(key: str, spec: Mapping[str, Any], where: str) -> Param:
    if "choices" in spec:
        extra = set(spec) - {"choices"}
        ch = spec["choices"]
        if extra or not isinstance(ch, list) or not ch:
            raise ConfigError(f"{where}: {key}: choices must be a non-empty list, alone")
        return Param(key, choices=tuple(ch))
    bad = set(spec) - _RANGE
    if bad or "low" not in spec or "high" not in spec:
        raise ConfigError(f"{where}: {key}: a range is {{low, high, log, int}}, got "
                          f"{sorted(spec)}; a constant mapping needs no low/high")
    lo, hi = spec["low"], spec["high"]
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in (lo, hi)):
        raise ConfigError(f"{where}: {key}: low and high must be numbers, got {lo!r}, {hi!r}")
    log = bool(spec.get("log", False))
    if not lo < hi or (log and lo <= 0):
        raise ConfigError(f"{where}: {key}: the range [{lo}, {hi}] is empty"
                          + (" or not positive (log scale)" if log else "")
                          + "; give low < high" + (", both > 0" if log else ""))
    return Param(key, float(lo), float(hi), log, bool(spec.get("int", False)))


def _is_param(v: Any) -> bool:
    return isinstance(v, Mapping) and ("choices" in v or "low" in v or "high" in v)


def parse_space(raw: Any, base: Mapping[str, Any], *, source: str = "(dict)") -> SearchSpace:
    """Parse and check a space against the base config (every key, range end and family)."""
    if not isinstance(raw, Mapping) or "families" not in raw or set(raw) - _TOP:
        got = sorted(raw) if isinstance(raw, Mapping) else type(raw).__name__
        raise ConfigError(f"search space {source}: top-level keys are {sorted(_TOP)} "
                          f"(families required), got {got}")
    fams_raw = raw["families"]
    shared = raw.get("shared") or {}
    if not isinstance(fams_raw, Mapping) or not fams_raw or not isinstance(shared, Mapping):
        raise ConfigError(f"search space {source}: families must map names to "
                          "{set: {key: value}} and shared to {key: range}")
    fams = []
    for fname, f in fams_raw.items():
        where = f"search space {source}, family {fname!r}"
        if not isinstance(f, Mapping) or set(f) - _FAMILY or not isinstance(f.get("set"),
                                                                              Mapping):
            raise ConfigError(f"{where}: a family is {{set: {{key: value or range}}}}")
        items = {**f["set"], **shared}
        consts = {k: v for k, v in items.items() if not _is_param(v)}
        params = tuple(_param(k, v, where) for k, v in items.items() if _is_param(v))
        fam = Family(str(fname), consts, params, tuple(items))
        _check(SearchSpace((fam,), source), base, fam, where)
        fams.append(fam)
    return SearchSpace(tuple(fams), source)


def _check(space: SearchSpace, base: Mapping[str, Any], fam: Family, where: str) -> None:
    from splitcem.experiment import build_defenses

    for p in fam.params:
        for v in ((p.choices or (p.low, p.high)) if not p.integer else
                  (int(p.low or 0), int(p.high or 0))):
            vals = {q.key: q.middle() for q in fam.params}
            vals[p.key] = v
            try:
                cfg = space.config(base, fam.name, vals)
                build_defenses(cfg)
            except ConfigError as e:
                msg = " ".join(ln.strip() for ln in str(e).splitlines()[:3])
                raise ConfigError(f"{where}: {p.key}={v!r}: {msg}") from None


def load_space(path: str | Path, base: Mapping[str, Any]) -> SearchSpace:
    """Read and check a space file (see the module docstring)."""
    p = Path(path)
    try:
        raw = yaml.safe_load(p.read_text())
    except OSError as e:
        raise ConfigError(f"search space {p}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"search space {p}: not YAML ({str(e).splitlines()[0]})") from None
    return parse_space(raw, base, source=str(p))


def default_space(base: Mapping[str, Any], *, cut: list[int] | None = None) -> SearchSpace:
    """Per defense family of the base: noise sigma alone (CEM off, a point) and noise sigma
    with CEM lambda, both on log scales; each other (zoo) defense of the base with its
    strength from a tenth to ten times its value; ``cut``: also search ``model.cut``."""
    from splitcem.defenses.base import DEFENSES

    sigma = {"low": 0.01, "high": 1.0, "log": True}
    noise = [{"name": "noise", "sigma": 0.1}]
    fams: dict[str, Any] = {
        NOISE: {"set": {"defenses": noise, "defenses.0.sigma": sigma, "cem.lambda": 0.0}},
        "cem": {"set": {"defenses": noise, "defenses.0.sigma": sigma,
                        "cem.lambda": {"low": 0.3, "high": 100.0, "log": True}}},
    }
    for d in base.get("defenses") or []:
        name = d.get("name")
        if name == "noise" or name not in DEFENSES:
            continue
        strength = getattr(DEFENSES.get(name), "strength_param", None)
        v = d.get(strength) if strength else None
        if isinstance(v, int | float) and v > 0:
            fams[name] = {"set": {"defenses": [d], f"defenses.0.{strength}":
                                  {"low": v / 10, "high": v * 10, "log": True},
                                  "cem.lambda": 0.0}}
    raw: dict[str, Any] = {"families": fams}
    if cut:
        raw["shared"] = {"model.cut": {"choices": list(cut)}}
    return parse_space(raw, base, source="(default)")
