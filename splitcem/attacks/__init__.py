"""Model inversion attacks behind one interface, threat models and the worst-case suite.

Importing this package registers the built-in attacks (``list_attacks()``):
``mean_image`` (baseline), ``decoder``, ``decoder_strong``, ``decoder_adaptive``,
``rmle`` and ``gan``. See docs/attacks.md for the threat models and what each attack needs.
"""

from splitcem.attacks.audit import as_dataset, audit
from splitcem.attacks.base import (
    ATTACKS,
    Attack,
    AttackResult,
    AttackTarget,
    create_attack,
    list_attacks,
    register_attack,
)
from splitcem.attacks.decoder import (
    AdaptiveDecoderAttack,
    DecoderAttack,
    MeanImageAttack,
    ResDecoder,
)
from splitcem.attacks.gan import GanAttack
from splitcem.attacks.rmle import RMLEAttack
from splitcem.attacks.suite import AttackReport, all_attack_specs, run_attacks, worst_case
from splitcem.attacks.threat import ACCESS_LEVELS, ThreatModel, parse_threats

__all__ = [
    "ACCESS_LEVELS",
    "ATTACKS",
    "AdaptiveDecoderAttack",
    "Attack",
    "AttackReport",
    "AttackResult",
    "AttackTarget",
    "DecoderAttack",
    "GanAttack",
    "MeanImageAttack",
    "RMLEAttack",
    "ResDecoder",
    "ThreatModel",
    "all_attack_specs",
    "as_dataset",
    "audit",
    "create_attack",
    "list_attacks",
    "parse_threats",
    "register_attack",
    "run_attacks",
    "worst_case",
]
