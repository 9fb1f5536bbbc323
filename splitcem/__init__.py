"""splitcem: model-inversion robustness for split (collaborative) inference.

The small public surface; everything else lives in its sub-package (``splitcem.data``,
``splitcem.models``, ``splitcem.defenses``, ``splitcem.cem``, ``splitcem.attacks``).

Example:
    >>> import splitcem
    >>> "cem" in splitcem.list_defenses() and "noise" in splitcem.list_defenses()
    True
"""

from splitcem.config import RunConfig, load_config
from splitcem.defenses import Defense, DefenseStack, create_defense, list_defenses
from splitcem.experiment import run_experiment
from splitcem.models import SplitModel, create_split_model
from splitcem.train import evaluate, train

__version__ = "0.1.0"

__all__ = [
    "Defense",
    "DefenseStack",
    "RunConfig",
    "SplitModel",
    "create_defense",
    "create_split_model",
    "evaluate",
    "list_defenses",
    "load_config",
    "run_experiment",
    "train",
]
