"""Which runs are the same run: the hashes the run record (:mod:`splitcem.record`) stores
and compares. A hash covers what a run *measures*: its config without the keys that change
no result, with the numeric path as it resolved (``amp: auto`` becomes what ran), and for
attacks the aux / eval partition they saw."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from splitcem.config import RunConfig

__all__ = ["attack_hash", "attack_split", "comparable", "resolved_amp", "resolved_attacks",
           "train_hash"]

#: config keys that do not change what a run measures (ignored when matching runs)
_IGNORED = {"name", "device"}


def comparable(cfg: dict[str, Any]) -> dict[str, Any]:
    """A resolved config without the keys that do not change results (name, device,
    TensorBoard logging), for matching a trial to an existing run."""
    out = {k: v for k, v in cfg.items() if k not in _IGNORED}
    train = dict(out.get("train") or {})
    train.pop("tensorboard", None)
    out["train"] = train
    return out


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()[:16]


def _device(cfg: RunConfig, device: str | None) -> str:
    from splitcem.runtime import resolve_device

    return resolve_device(device if device is not None else cfg.device).type


def resolved_amp(value: Any, device: str, channels_last: Any = "auto") -> tuple[bool, bool]:
    """(amp, channels_last) as :func:`splitcem.runtime.resolve_numeric_path` resolves them."""
    from splitcem.runtime import resolve_numeric_path

    p = resolve_numeric_path(value, channels_last, device, quiet=True)
    return p.amp, p.channels_last


def train_hash(cfg: RunConfig, *, device: str | None = None,
               numerics: dict[str, Any] | None = None) -> str:
    """The hash of what training ``cfg`` runs: the config up to the keys that change no
    result, with the numeric path resolved (from ``numerics`` as recorded, else for
    ``device`` on this machine)."""
    d = comparable(cfg.to_dict())
    d.pop("attack", None)
    data = dict(d["data"])
    data.pop("split_seed", None)  # training never sees the aux / eval partition
    d["data"] = data
    if numerics and "amp" in numerics and "channels_last" in numerics:
        amp, cl = bool(numerics["amp"]), bool(numerics["channels_last"])
    else:
        amp, cl = resolved_amp(cfg.train.amp, _device(cfg, device), cfg.train.channels_last)
    d["train"] = {**d["train"], "amp": amp, "channels_last": cl}
    return _digest(d)


def resolved_attacks(specs: list[dict[str, Any]], device: str) -> list[dict[str, Any]]:
    """Attack specs with ``amp`` as it resolves on ``device``, so that runs whose decoders
    trained bf16 and float32 differ. A spec without ``amp`` counts as ``auto`` (the default
    of every attack that has the setting; this module may not import the attacks to ask
    which do): an attack without the setting then matches only runs from machines that
    resolve ``auto`` alike, which errs toward running again, never toward a wrong match."""
    return [{**s, "amp": resolved_amp(s.get("amp", "auto"), device)[0]} for s in specs]


_SPLIT_KEYS = ("seed", "aux_fraction", "limit_test", "test_subset_seed")


def attack_split(cfg: RunConfig) -> dict[str, Any]:
    """The aux / eval partition ``cfg``'s attacks see: its seed, fraction and test subset."""
    d = cfg.data
    return {"seed": cfg.seed if d.split_seed is None else d.split_seed,
            "aux_fraction": d.aux_fraction, "limit_test": d.limit_test,
            "test_subset_seed": cfg.seed if d.limit_test is not None else None}


def attack_hash(cfg: RunConfig, *, device: str | None = None,
                numerics: dict[str, Any] | None = None,
                split: dict[str, Any] | None = None) -> str:
    """The hash of ``cfg``'s attacks: its attack section (each attack's ``amp`` resolved on
    the device), the partition they see (``split``, default :func:`attack_split`) and the
    trained model's :func:`train_hash`."""
    dev = (numerics or {}).get("device") or _device(cfg, device)
    att = cfg.to_dict()["attack"]
    split = split if split is not None else attack_split(cfg)
    return _digest({"attack": {**att, "attacks": resolved_attacks(att.get("attacks") or [],
                                                                  dev)},
                    "split": {k: split.get(k) for k in _SPLIT_KEYS},
                    "train": train_hash(cfg, device=device, numerics=numerics)})
