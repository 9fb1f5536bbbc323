"""The model registry: architecture name -> function building its uncut :class:`Backbone`.

Named variants are registered functions passing explicit keyword arguments (timm's
``@register_model``); nothing parses a name. ``create_split_model`` (``split.py``) resolves
the name here once and cuts the network it gets back.
"""

from __future__ import annotations

from collections.abc import Callable

from splitcem._registry import Registry
from splitcem.models.backbone import Backbone

__all__ = ["MODELS", "list_models", "register_model"]

#: entries build a :class:`Backbone` (cut by layer count) or, e.g. from a plugin's
#: ``splitcem.models`` entry point, any chain-shaped ``nn.Module`` (cut by module name)
MODELS: Registry[Backbone] = Registry("model", group="splitcem.models")


def register_model(
    name: str, *, force: bool = False
) -> Callable[[Callable[..., Backbone]], Callable[..., Backbone]]:
    """Decorator registering a backbone factory under ``name``.

    The factory must accept the keyword arguments ``num_classes``, ``in_channels``,
    ``image_size`` and ``width`` and return a :class:`Backbone`.
    """
    return MODELS.register(name, force=force)


def list_models() -> list[str]:
    """Sorted names of the registered architectures (valid ``arch`` values)."""
    return MODELS.names()
