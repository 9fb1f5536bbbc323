"""Sweep files: a base config, named variants, a grid over dotted config keys, and seeds.

A sweep file is YAML (paths are relative to the file)::

    name: cifar10_cpu                  # the sweep's folder name (default: the file's stem)
    base: ../cpu/cifar10_noise.yaml    # the run config every trial starts from
    set:                               # overrides for every trial (dotted keys)
      attack.attacks: [{name: decoder, epochs: 25}]
    seeds: 1                           # N: seeds base, base+1, ...; or a list [125, 126];
                                       # or {min: 2, max: 8, until: decided}
    per_round: 4                       # seeds until decided: at most 4 settings grow per
                                       # round, closest to a decision first (default: all)
    grid:                              # cartesian product over dotted keys (optional)
      defenses.0.sigma: [0.1, 0.2]
    variants:                          # optional: named variants, each crossed with its grid
      - name: noise{sigma}             # {last key part} takes the grid value
        grid: {defenses.0.sigma: [0.1, 0.15]}
        seeds: [125, 126]
      - name: noise0.1_cem{lambda}
        base: ../cpu/cifar10_noise.yaml   # a variant may start from another config
        set: {cem: {lambda: 1.0, clusters: 5, form: paper}}
        grid: {cem.lambda: [1, 3]}

Each variant's grid extends the top-level one; its ``set`` and ``seeds`` override the
top-level ones. ``seeds: {min, max, until: decided}`` (a
:class:`~splitcem.study.frontier_plan.SeedPolicy`) starts with ``min`` seeds (base, base+1,
...); after them the engine adds seeds to the settings still undecided against the baseline,
up to ``max`` (:mod:`splitcem.study.adaptive`), at most ``per_round`` settings per round
(closest to a decision first; then the rounds re-plan with what those runs showed). Every
trial is one run directory named ``NAME_s{seed}``, where NAME is the variant's name with
``{key}`` placeholders filled from the grid (the last part of the dotted key); a name
without placeholders gets ``_{key}{value}`` appended per grid key. Everything is validated
here, before any trial runs.
"""

from __future__ import annotations

import copy
import itertools
import re
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from splitcem.config import RunConfig, load_config, set_path
from splitcem.errors import ConfigError
from splitcem.runtime import Setting, check_setting

if TYPE_CHECKING:
    from splitcem.study.frontier_plan import SeedPolicy

__all__ = ["SweepSpec", "Trial", "config_trials", "expand", "format_value", "is_sweep_file",
           "load_sweep", "pin_amp"]

_TOP_KEYS = {"name", "base", "set", "seeds", "per_round", "grid", "variants", "out"}
_VARIANT_KEYS = {"name", "base", "set", "seeds", "grid"}
_SAFE = re.compile(r"[^A-Za-z0-9._=+-]")


@dataclass
class Trial:
    """One run of a sweep: its directory name, resolved config and the values that made it."""

    name: str
    cfg: RunConfig
    seed: int
    values: dict[str, Any] = field(default_factory=dict)  # grid key -> value
    variant: str = ""
    #: the trial's name without ``_s{seed}``: one setting, all its seeds
    stem: str = ""
    #: the setting's seed policy when the sweep file gave ``seeds: {min, max, until}``
    policy: SeedPolicy | None = None

    @property
    def setting(self) -> str:
        """The setting this trial is a seed of: ``stem``, else its name without ``_s{seed}``."""
        return self.stem or self.name.rsplit("_s", 1)[0]

    def with_seed(self, seed: int) -> Trial:
        """The same setting at another seed (named ``{stem}_s{seed}``)."""
        name = f"{self.setting}_s{seed}"
        cfg = load_config({**self.cfg.to_dict(), "name": name, "seed": seed})
        return Trial(name, cfg, seed, dict(self.values), self.variant, self.stem, self.policy)


@dataclass
class SweepSpec:
    """A parsed sweep file (see the module docstring); ``root`` is the file's folder."""

    name: str
    root: Path
    base: str | None
    set: dict[str, Any]
    seeds: int | list[int] | SeedPolicy
    grid: dict[str, list[Any]]
    variants: list[dict[str, Any]]
    out: str | None = None
    source: str = "(dict)"
    #: seeds until decided: at most this many settings grow per round (``None``: all)
    per_round: int | None = None
    #: command-line ``--set`` overrides: applied to every trial, last
    overrides: dict[str, Any] = field(default_factory=dict)
    #: ``--amp``: every trial's training and attacks on this numeric path (:func:`pin_amp`)
    amp: Setting | None = None


def _mapping(v: Any, what: str) -> dict[str, Any]:
    if v is None:
        return {}
    if not isinstance(v, dict):
        raise ConfigError(f"sweep {what} must be a mapping of dotted keys to values, got {v!r}")
    return dict(v)


def _grid(v: Any, what: str) -> dict[str, list[Any]]:
    g = _mapping(v, what)
    for k, vals in g.items():
        if not isinstance(vals, list) or not vals:
            raise ConfigError(f"sweep {what}.{k} must be a non-empty list of values, got {vals!r}")
    return g


def _seeds(v: Any, what: str) -> int | list[int] | SeedPolicy:
    if isinstance(v, dict):
        from splitcem.study.frontier_plan import SeedPolicy

        try:
            return SeedPolicy.parse(v)
        except ConfigError as e:
            raise ConfigError(f"sweep {what}: {e}") from None
    if isinstance(v, bool) or v is None:
        raise ConfigError(f"sweep {what} must be a count N >= 1 or a list of seeds, got {v!r}")
    if isinstance(v, int):
        if v < 1:
            raise ConfigError(f"sweep {what} must be >= 1, got {v}")
        return v
    if isinstance(v, list) and v and all(isinstance(s, int) and not isinstance(s, bool)
                                         for s in v):
        if len(set(v)) != len(v):
            raise ConfigError(f"sweep {what} lists a seed twice: {v}")
        return list(v)
    raise ConfigError(f"sweep {what} must be a count N >= 1, a list of integer seeds or "
                      f"{{min: 2, max: 8, until: decided}}, got {v!r}")


def load_sweep(source: str | Path | dict[str, Any]) -> SweepSpec:
    """Read and check a sweep file (or a dict with the same keys)."""
    if isinstance(source, dict):
        raw, root, where, stem = source, Path.cwd(), "(dict)", "sweep"
    else:
        path = Path(source)
        if not path.is_file():
            raise ConfigError(f"sweep file {path} does not exist (see configs/sweeps/)")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"sweep file {path} is not valid YAML: {e}") from e
        root, where, stem = path.resolve().parent, str(path), path.stem
    if not isinstance(raw, dict):
        raise ConfigError(f"sweep file {where} must be a mapping at the top level")
    unknown = sorted(set(raw) - _TOP_KEYS)
    if unknown:
        raise ConfigError(f"sweep file {where}: unknown key(s) {unknown}; known: "
                          f"{sorted(_TOP_KEYS)}")
    variants = raw.get("variants") or []
    if not isinstance(variants, list):
        raise ConfigError(f"sweep file {where}: variants must be a list of mappings")
    for i, v in enumerate(variants):
        if not isinstance(v, dict) or not isinstance(v.get("name"), str):
            raise ConfigError(f"sweep file {where}: variant #{i} needs a 'name', got {v!r}")
        bad = sorted(set(v) - _VARIANT_KEYS)
        if bad:
            raise ConfigError(f"sweep file {where}: variant {v['name']!r} has unknown key(s) "
                              f"{bad}; known: {sorted(_VARIANT_KEYS)}")
    return SweepSpec(
        name=str(raw.get("name") or stem),
        root=root,
        base=raw.get("base"),
        set=_mapping(raw.get("set"), "set"),
        seeds=_seeds(raw.get("seeds", 1), "seeds"),
        grid=_grid(raw.get("grid"), "grid"),
        variants=variants,
        out=raw.get("out"),
        source=where,
        per_round=_per_round(raw.get("per_round"), where),
    )


def _per_round(v: Any, where: str) -> int | None:
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int) or v < 1:
        raise ConfigError(f"sweep file {where}: per_round must be an integer >= 1 (the most "
                          f"settings one round of seeds until decided grows), got {v!r}")
    return v


def is_sweep_file(path: str | Path) -> bool:
    """Whether a YAML file is a sweep file (has ``grid``, ``variants``, ``seeds`` or
    ``base``) rather than a run config."""
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError):
        return False
    return isinstance(raw, dict) and bool({"grid", "variants", "seeds", "base"} & set(raw)) \
        and not ({"model", "train", "data", "defenses"} & set(raw))


def add_overrides(spec: SweepSpec, overrides: list[str] | tuple[str, ...], *,
                  amp: Setting | None = None) -> SweepSpec:
    """``key.sub=value`` overrides (values parsed as YAML) added to every trial's ``set``;
    ``amp`` (``--amp``) pins every trial's numeric path (:func:`pin_amp`)."""
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        k, v = ov.split("=", 1)
        spec.overrides[k.strip()] = yaml.safe_load(v)
    if amp is not None:
        spec.amp = check_setting("--amp", amp)
    return spec


def pin_amp(raw: dict[str, Any], amp: Setting) -> dict[str, Any]:
    """A run config (as a dict) with training's ``amp`` and that of every attack that has
    the setting set to ``amp``.

    Why: ``auto`` resolves per machine (bf16 autocast where bf16 is native, else float32),
    and a run's hashes hold the path as it resolved, so a sweep continued on a machine
    without native bf16 neither adopts nor pools the runs made where it is native; pinning
    ``true`` there keeps their numeric path (a CPU without bf16 units runs it through float32
    kernels on bf16-rounded operands, :mod:`splitcem._bf16`), ``false`` pins float32
    everywhere.
    """
    import inspect

    from splitcem.attacks import ATTACKS

    out = copy.deepcopy(raw)
    out.setdefault("train", {})["amp"] = amp
    for spec in (out.get("attack") or {}).get("attacks") or []:
        name = spec.get("name") if isinstance(spec, dict) else None
        if isinstance(name, str) and name in ATTACKS \
                and "amp" in inspect.signature(ATTACKS.get(name)).parameters:
            spec["amp"] = amp
    return out


def format_value(v: Any) -> str:
    """A config value as it appears in a trial name: ``0.1``, ``3`` (for 3.0), ``true``."""
    if isinstance(v, bool):
        return str(v).lower()
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, int | str):
        return str(v)
    return yaml.safe_dump(v, default_flow_style=True).strip()


def _trial_name(template: str, values: dict[str, Any]) -> str:
    short = {k.rsplit(".", 1)[-1]: format_value(v) for k, v in values.items()}
    fields = [f for _, f, _, _ in string.Formatter().parse(template) if f]
    if fields:
        missing = [f for f in fields if f not in short]
        if missing:
            raise ConfigError(f"sweep variant name {template!r} uses {missing}, which are not "
                              f"grid keys (their last parts: {sorted(short) or 'none'})")
        name = template.format(**short)
    else:
        name = "_".join([template] + [f"{k}{v}" for k, v in short.items()]) if short else template
    return _SAFE.sub("-", name)


def _seed_list(seeds: int | list[int] | SeedPolicy, base_seed: int) -> list[int]:
    if isinstance(seeds, list):
        return list(seeds)
    n = seeds if isinstance(seeds, int) else seeds.min
    return [base_seed + i for i in range(n)]


def _apply(raw: dict[str, Any], values: dict[str, Any]) -> dict[str, Any]:
    """``raw`` with each dotted key set to its value (values are used as they are, not
    re-parsed from text)."""
    out = copy.deepcopy(raw)
    for k, v in values.items():
        set_path(out, k, copy.deepcopy(v))
    return out


def expand(spec: SweepSpec) -> list[Trial]:
    """All trials of a sweep in file order, with validated configs; names are unique.

    A trial listed twice with the same config (two variants that overlap) runs once; the
    same name with another config is an error.
    """
    from splitcem.experiment import build_defenses, check_attacks

    variants = spec.variants or [{"name": spec.name}]
    trials: dict[str, Trial] = {}
    for v in variants:
        base = v.get("base", spec.base)
        grid = {**spec.grid, **_grid(v.get("grid"), f"variant {v['name']!r} grid")}
        common = {**spec.set, **_mapping(v.get("set"), f"variant {v['name']!r} set")}
        seeds = _seeds(v["seeds"], "variant seeds") if "seeds" in v else spec.seeds
        raw: dict[str, Any] = {}
        where = "(defaults)"
        if base is not None:
            path = (spec.root / base) if not Path(base).is_absolute() else Path(base)
            where = str(path)
            raw = load_config(path).to_dict()
        keys = list(grid)
        for combo in itertools.product(*(grid[k] for k in keys)):
            values = dict(zip(keys, combo, strict=True))
            stem = _trial_name(v["name"], values)
            try:
                base_seed = load_config(_apply(raw, {**common, **values,
                                                     **spec.overrides})).seed
            except ConfigError as e:
                raise ConfigError(f"sweep {spec.source}, trial {stem} (from {where}): "
                                  f"{e}") from None
            for seed in _seed_list(seeds, base_seed):
                name = f"{stem}_s{seed}"
                try:
                    cfg = load_config(_apply(raw, {**common, **values, **spec.overrides,
                                                   "name": name, "seed": seed}))
                    if spec.amp is not None:  # on the full config: defaults included
                        cfg = load_config(pin_amp(cfg.to_dict(), spec.amp))
                    build_defenses(cfg)  # defense names and parameters, checked now
                    check_attacks(cfg)
                except ConfigError as e:
                    raise ConfigError(f"sweep {spec.source}, trial {name} (from {where}): "
                                      f"{e}") from None
                old = trials.get(name)
                if old is not None:
                    if old.cfg.to_dict() != cfg.to_dict():
                        raise ConfigError(f"sweep {spec.source}: two trials are named {name!r} "
                                          "with different configs; give the variants distinct "
                                          "names or {key} placeholders")
                    continue
                trials[name] = Trial(name, cfg, seed, values, v["name"], stem,
                                     None if isinstance(seeds, int | list) else seeds)
    return list(trials.values())


def config_trials(configs: list[str | Path] | tuple[str | Path, ...],
                  overrides: list[str] | tuple[str, ...] = ()) -> list[Trial]:
    """The list-of-configs front door: one trial per run config (named by its ``name``,
    its own seed), ``overrides`` (``key.sub=value``) applied to each; names must differ."""
    from splitcem.experiment import build_defenses, check_attacks

    trials: list[Trial] = []
    for path in configs:
        cfg = load_config(path, list(overrides))
        if any(t.name == cfg.name for t in trials):
            raise ConfigError(f"two configs in the sweep are named {cfg.name!r}; names must "
                              "differ")
        build_defenses(cfg)
        check_attacks(cfg)
        trials.append(Trial(cfg.name, cfg, cfg.seed, {}, cfg.name))
    return trials
