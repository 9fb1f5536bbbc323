"""Obfuscation defenses behind one interface, found by name through a registry.

Importing this package registers the built-in defenses.
"""

from splitcem.defenses import (
    adversarial,  # noqa: F401  (registers "adversarial")
    cem,  # noqa: F401  (registers "cem")
    filters,  # noqa: F401  (registers "dropout", "topk")
    ldp,  # noqa: F401  (registers "ldp")
    noise,  # noqa: F401  (registers "noise")
    nopeek,  # noqa: F401  (registers "nopeek")
    patrol,  # noqa: F401  (registers "patrol")
)
from splitcem.defenses.base import (
    DEFENSES,
    Defense,
    DefenseStack,
    EpochContext,
    SetupContext,
    StepContext,
    create_defense,
    list_defenses,
    register_defense,
)
from splitcem.defenses.protect import Protected, make_stack, protect

__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseStack",
    "EpochContext",
    "Protected",
    "SetupContext",
    "StepContext",
    "create_defense",
    "list_defenses",
    "make_stack",
    "protect",
    "register_defense",
]
