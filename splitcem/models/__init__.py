"""Split models: VGG-BN and ResNet-20 cut into a client encoder and a server tail, and the
inversion decoder (``ResDecoder``) that attacks and adversarial training share.

``create_split_model(arch, num_classes=..., cut=..., ...)`` is the entry point; ``arch`` is
one of ``list_models()``. Importing this package registers the built-in architectures.
Any chain-shaped model of your own is cut by ``splitcem.split`` (``splitcem.models.cut``;
it is exported at the top level only, since ``splitcem.models.split`` names the module
that builds a :class:`SplitModel`).
"""

from splitcem.models import resnet, vgg  # noqa: F401  (register the architectures)
from splitcem.models.backbone import Backbone
from splitcem.models.cut import CutPoint, cut_points
from splitcem.models.decoder import ResDecoder
from splitcem.models.registry import MODELS, list_models, register_model
from splitcem.models.split import ACTIVATIONS, SplitModel, create_split_model

__all__ = [
    "ACTIVATIONS",
    "MODELS",
    "Backbone",
    "CutPoint",
    "ResDecoder",
    "SplitModel",
    "create_split_model",
    "cut_points",
    "list_models",
    "register_model",
]
