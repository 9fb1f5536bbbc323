"""splitcem: model-inversion robustness for split (collaborative) inference.

The small public surface; everything else lives in its sub-package (``splitcem.data``,
``splitcem.models``, ``splitcem.defenses``, ``splitcem.cem``, ``splitcem.attacks``).
Your own model and loop: ``split`` it, ``protect`` the client, ``audit`` it, ``export`` it
for serving (docs/byo.md).

Example:
    >>> import splitcem
    >>> "cem" in splitcem.list_defenses() and "noise" in splitcem.list_defenses()
    True
"""

from splitcem import _compat
from splitcem.attacks.audit import audit
from splitcem.config import RunConfig, load_config
from splitcem.defenses import Defense, DefenseStack, create_defense, list_defenses, protect
from splitcem.experiment import run_experiment
from splitcem.models import SplitModel, create_split_model
from splitcem.models.cut import cut_points, split
from splitcem.serving.byo import export
from splitcem.train import evaluate, train

# The one place the version is written: pyproject.toml reads it (setuptools dynamic version).
__version__ = "0.1.0"

_compat.install()  # old paths of the modules now in splitcem.study, one release

__all__ = [
    "Defense",
    "DefenseStack",
    "RunConfig",
    "SplitModel",
    "audit",
    "create_defense",
    "create_split_model",
    "cut_points",
    "evaluate",
    "export",
    "list_defenses",
    "load_config",
    "protect",
    "run_experiment",
    "split",
    "train",
]
