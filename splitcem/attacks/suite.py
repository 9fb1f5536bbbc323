"""Run several attacks against one target and report the worst case for the defender.

A defense is only worth what the strongest attack against it shows, so the verdict per
metric is the best score any applicable attack reached: lowest MSE, highest SSIM, highest
PSNR (each possibly from a different attack).

Attack specs are config dicts, ``{"name": <registered attack>, **params}``, plus two keys
the suite itself reads:

* ``label``: the name the result is reported under (default: ``name``); needed to run one
  attack twice with different parameters. Labels must be unique.
* ``init_from``: the label of an earlier decoder-based attack in the same list whose
  trained decoder this attack starts from (``rmle`` with ``init: decoder``, ``gan``),
  instead of training its own: saves a decoder training per attack. A decoder attack
  (``decoder``, ``decoder_adaptive``, ...) given ``init_from`` continues that decoder's
  training for its own ``epochs`` (same width and depth), e.g. the defense-aware decoder
  fine-tuning the plain one.

Every spec is validated (names, parameters, labels, ``init_from``) before any attack runs.

Several threat models (e.g. inference- and training-time) can be given at once: every
attack then runs under each, results are labelled ``attack@setting/access``, and the worst
case is taken across all of them.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from splitcem.attacks.base import Attack, AttackResult, AttackTarget, create_attack, list_attacks
from splitcem.attacks.decoder import ResDecoder
from splitcem.attacks.threat import ThreatModel, parse_threats
from splitcem.errors import ConfigError
from splitcem.metrics import HIGHER_IS_BETTER, METRICS

__all__ = ["AttackReport", "all_attack_specs", "parse_specs", "run_attacks", "worst_case"]

log = logging.getLogger(__name__)


@dataclass
class AttackReport:
    """Results of a suite run.

    Attributes:
        threat: The (first) threat model the attacks ran under.
        results: Label -> :class:`AttackResult`, in the order the attacks ran.
        skipped: Label -> why the attack did not run (e.g. it needs white-box access).
        worst: Metric -> ``{"attack": label, "value": v}``: the defender's worst case.
        threats: Every threat model, in order; ``result_threat`` maps each result's label
            to the ``short`` name of the threat model it ran under.
    """

    threat: ThreatModel
    results: dict[str, AttackResult] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)
    worst: dict[str, dict[str, Any]] = field(default_factory=dict)
    threats: list[ThreatModel] = field(default_factory=list)
    result_threat: dict[str, str] = field(default_factory=dict)
    #: label -> the trained ResDecoder of each decoder-based attack (not in ``to_dict``)
    decoders: dict[str, nn.Module] = field(default_factory=dict, repr=False)

    def strongest_decoder(self) -> tuple[str, nn.Module] | None:
        """(label, decoder) of the decoder-based attack with the lowest MSE, if any ran."""
        scored = [(self.results[k].metrics["mse"], k) for k in self.decoders]
        if not scored:
            return None
        label = min(scored)[1]
        return label, self.decoders[label]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready record (no images)."""
        attacks = {}
        for k, r in self.results.items():
            attacks[k] = r.to_dict()
            if k in self.result_threat:
                attacks[k]["threat"] = self.result_threat[k]
        return {
            "threat": self.threat.to_dict(),
            "threats": [t.to_dict() for t in (self.threats or [self.threat])],
            "attacks": attacks,
            "skipped": dict(self.skipped),
            "worst": {k: dict(v) for k, v in self.worst.items()},
        }

    def table(self) -> str:
        """A small markdown table: one row per attack, plus the worst case."""
        rows = ["| attack | MSE | SSIM | PSNR (dB) | seconds |", "|---|---|---|---|---|"]
        for k, r in self.results.items():
            m = r.metrics
            rows.append(f"| {k} | {m['mse']:.5f} | {m['ssim']:.4f} | {m['psnr']:.2f} | "
                        f"{r.seconds:.1f} |")
        if self.worst:
            w = self.worst
            rows.append(f"| **worst case** | {w['mse']['value']:.5f} ({w['mse']['attack']}) | "
                        f"{w['ssim']['value']:.4f} ({w['ssim']['attack']}) | "
                        f"{w['psnr']['value']:.2f} ({w['psnr']['attack']}) | |")
        for k, why in self.skipped.items():
            rows.append(f"| {k} | skipped: {why} | | | |")
        return "\n".join(rows)


def worst_case(results: Mapping[str, AttackResult]) -> dict[str, dict[str, Any]]:
    """Per metric, the attack with the best reconstruction score (ties: the first).

    Example:
        >>> import torch
        >>> e = torch.zeros(0)
        >>> r = {"a": AttackResult("a", {"mse": .1, "ssim": .5, "psnr": 10.}, e, e, 1.),
        ...      "b": AttackResult("b", {"mse": .2, "ssim": .6, "psnr": 7.}, e, e, 1.)}
        >>> {k: v["attack"] for k, v in worst_case(r).items()}
        {'mse': 'a', 'ssim': 'b', 'psnr': 'a'}
    """
    out: dict[str, dict[str, Any]] = {}
    for metric in METRICS:
        best_label, best = None, None
        for label, r in results.items():
            v = r.metrics[metric]
            better = best is None or (v > best if HIGHER_IS_BETTER[metric] else v < best)
            if better:
                best_label, best = label, v
        if best_label is not None:
            out[metric] = {"attack": best_label, "value": best}
    return out


def all_attack_specs() -> list[dict[str, Any]]:
    """One spec per registered attack with its defaults; the attacks that declare
    ``starts_from_decoder`` (``rmle``, ``gan``) start from the ``decoder`` attack's trained
    decoder (what ``splitcem attack --all`` runs)."""
    specs: list[dict[str, Any]] = []
    for name in list_attacks():
        spec: dict[str, Any] = {"name": name}
        if create_attack(name).starts_from_decoder and "decoder" in list_attacks():
            spec["init_from"] = "decoder"
        specs.append(spec)
    # decoder first, so that init_from finds it
    specs.sort(key=lambda s: "init_from" in s)
    return specs


def parse_specs(attack_specs: Sequence[Mapping[str, Any]]
                ) -> list[tuple[str, Attack, str | None]]:
    """Validate specs and build the attacks: a list of (label, attack, init_from)."""
    if isinstance(attack_specs, Mapping | str):
        raise ConfigError("attack specs must be a list of {name: ..., **params} mappings")
    out: list[tuple[str, Attack, str | None]] = []
    labels: set[str] = set()
    for i, raw in enumerate(attack_specs):
        if not isinstance(raw, Mapping) or "name" not in raw:
            raise ConfigError(f"attack spec #{i} must be a mapping with a 'name' key "
                              f"(one of {', '.join(list_attacks())}), got {raw!r}")
        spec = dict(raw)
        name = spec.pop("name")
        label = str(spec.pop("label", name))
        init_from = spec.pop("init_from", None)
        if label in labels:
            raise ConfigError(f"attack label {label!r} is used twice; give each spec a unique "
                              "'label' to run an attack more than once")
        if init_from is not None and init_from not in labels:
            raise ConfigError(f"attack {label!r}: init_from={init_from!r} must name an earlier "
                              f"attack in the list (earlier labels: {sorted(labels) or 'none'})")
        attack = create_attack(name, **spec)
        if init_from is not None and not (attack.starts_from_decoder
                                          or attack.accepts_decoder):
            raise ConfigError(f"attack {label!r} ({name}) cannot start from another attack's "
                              "decoder; remove init_from")
        labels.add(label)
        out.append((label, attack, init_from))
    return out


def run_attacks(
    target: AttackTarget,
    splits: Any,
    attack_specs: Sequence[Mapping[str, Any]],
    *,
    threat: ThreatModel | Sequence[ThreatModel] | str | Mapping[str, Any] | None = None,
    progress: bool = True,
) -> AttackReport:
    """Run every attack the threat model allows against ``target``; skip the others with
    the reason; return the results and the worst case per metric.

    Args:
        target: The deployed client pipeline.
        splits: A ``DataSplits`` (train, aux, eval, test); the threat model picks the
            auxiliary and held-out sets from it.
        attack_specs: ``[{"name": "decoder", "epochs": 50}, {"name": "rmle", ...}, ...]``.
        threat: One threat model or several (anything :func:`parse_threats` takes).
            Defaults to ``ThreatModel()`` (inference-time, white-box). With several, every
            attack runs under each (labels ``attack@setting/access``) and the worst case is
            taken across all of them.
    """
    threats = parse_threats(threat)
    parse_specs(attack_specs)  # validate everything before the first (long) attack
    tags = [t.short for t in threats]
    if len(set(tags)) < len(tags):
        tags = [f"{t}#{i}" for i, t in enumerate(tags)]
    report = AttackReport(threat=threats[0], threats=threats)
    for tm, tag in zip(threats, tags, strict=True):
        qualify = (lambda s, tag=tag: f"{s}@{tag}") if len(threats) > 1 else (lambda s: s)
        aux, heldout = tm.select(splits)
        trained: dict[str, Attack] = {}
        for label, attack, init_from in parse_specs(attack_specs):  # fresh attacks per threat
            why = tm.allows(attack.requires)
            if why is None and init_from is not None and init_from not in trained:
                why = f"init_from={init_from!r} did not run"
            if why is not None:
                report.skipped[qualify(label)] = why
                log.info("attack %s skipped: %s", qualify(label), why)
                continue
            if init_from is not None:
                src = getattr(trained[init_from], "decoder", None)
                if src is None:
                    raise ConfigError(f"attack {label!r}: {init_from!r} has no trained decoder "
                                      "to start from; point init_from at a decoder attack")
                attack.init_decoder = copy.deepcopy(src)
            attack.name = qualify(label)
            result = attack.run(target, aux, heldout, progress=progress)
            if init_from is not None:
                result.extra["init_from"] = qualify(init_from)
            report.results[attack.name] = result
            dec = getattr(attack, "decoder", None)
            if isinstance(dec, ResDecoder):
                report.decoders[attack.name] = dec
            report.result_threat[attack.name] = tm.short
            trained[label] = attack
            log.info("attack %s: %s", attack.name, result.metrics)
    report.worst = worst_case(report.results)
    return report
