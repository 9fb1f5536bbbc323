"""The model registry: architecture name -> function building its uncut network.

Named variants are registered functions passing explicit keyword arguments (timm's
``@register_model``); nothing parses a name. ``create_split_model`` (``split.py``) resolves
the name here once and cuts the network it gets back: a :class:`Backbone` by layer count,
any other chain-shaped ``nn.Module`` (a user's model, a plugin's) by module name.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from splitcem._registry import Registry

__all__ = ["MODELS", "list_models", "register_model"]

#: also filled by third-party packages through the ``splitcem.models`` entry point group
MODELS: Registry[nn.Module] = Registry("model", group="splitcem.models")


def register_model(
    name: str, *, force: bool = False
) -> Callable[[Callable[..., nn.Module]], Callable[..., nn.Module]]:
    """Decorator registering a model factory under ``name``.

    A factory of a :class:`~splitcem.models.Backbone` must accept the keyword arguments
    ``num_classes``, ``in_channels``, ``image_size`` and ``width``. A factory of any other
    ``nn.Module`` receives those of them it accepts (a ``width`` other than 1 needs one); a
    run cuts its model at the module named by ``model.cut`` (see ``splitcem.cut_points``).
    """
    return MODELS.register(name, force=force)


def list_models() -> list[str]:
    """Sorted names of the registered architectures (valid ``arch`` values)."""
    return MODELS.names()
