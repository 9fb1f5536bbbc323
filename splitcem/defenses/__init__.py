"""Obfuscation defenses behind one interface, found by name through a registry.

Importing this package registers the built-in defenses.
"""

from splitcem.defenses import noise  # noqa: F401  (registers "noise")
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

__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseStack",
    "EpochContext",
    "SetupContext",
    "StepContext",
    "create_defense",
    "list_defenses",
    "register_defense",
]
