"""The split model: client encoder | server tail, cut from any registered backbone.

Why a separate module: the cut, the bottleneck, the output activation and the two width
multipliers are the same for every architecture, so they live here once, and architectures
only describe their layers (``backbone.py``).

Layout for ``cut=k`` (the reference's "noRELU_C8S1" + "sgm" with the defaults)::

    client = layers[:k] (client width) -> bottleneck conv3x3 (C_cut -> C_b, stride s)
             [-> ReLU if bottleneck_relu] -> activation (sigmoid / tanh / none)
    server = decompress: conv3x3 (C_b -> C_cut') + BN + ReLU, or for s > 1 a transposed
             conv3x3 (stride s) + BN + ReLU restoring the cut layer's resolution
             -> layers[k:] (server width) -> head (avg pool to 1x1, Linear)

C_cut is the cut layer's channel count at the client width, C_cut' at the server width.
Without a bottleneck (``bottleneck_channels=None``) the client sends the cut layer's output
(through the activation) and the server starts directly with ``layers[k:]``, or with a
conv3x3-BN-ReLU adapter when the two widths give the cut layer different channel counts.
"""

from __future__ import annotations

import inspect
import math
from collections import OrderedDict
from typing import Any

import torch
from torch import Tensor, nn

from splitcem._registry import Registry
from splitcem.errors import ConfigError
from splitcem.models.backbone import Backbone, init_weights
from splitcem.models.registry import MODELS

__all__ = ["ACTIVATIONS", "SplitModel", "create_split_model", "split_backbones", "split_module"]

# The client's output activation, by name. "sigmoid" keeps features in (0, 1), the range the
# noise levels sigma of the paper are quoted for.
ACTIVATIONS: Registry[nn.Module] = Registry("activation")
ACTIVATIONS.register("sigmoid")(nn.Sigmoid)
ACTIVATIONS.register("tanh")(nn.Tanh)
ACTIVATIONS.register("none")(nn.Identity)


class SplitModel(nn.Module):
    """A classifier cut in two: ``forward(x) = server(client(x))``.

    Attributes:
        client: The encoder the data owner runs: (B, C_in, H, W) -> (B, *feature_shape).
        server: The tail and classifier: (B, *feature_shape) -> (B, num_classes).
        feature_shape: (C, H, W) of the client's output, the "smashed data".
        config: The keyword arguments of :func:`create_split_model` that rebuild this model
            (``create_split_model(**model.config)``); store it in checkpoints.
    """

    def __init__(
        self,
        client: nn.Module,
        server: nn.Module,
        *,
        feature_shape: tuple[int, int, int],
        config: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.client = client
        self.server = server
        c, h, w = feature_shape
        self._feature_shape: tuple[int, int, int] = (int(c), int(h), int(w))
        self.config: dict[str, Any] = dict(config or {})

    @property
    def feature_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of the client's output."""
        return self._feature_shape

    def num_client_params(self) -> int:
        """Number of parameters of the client encoder (bottleneck included)."""
        return sum(p.numel() for p in self.client.parameters())

    def num_server_params(self) -> int:
        """Number of parameters of the server tail (classifier included)."""
        return sum(p.numel() for p in self.server.parameters())

    def forward(self, x: Tensor) -> Tensor:  # (B, C_in, H, W) -> (B, num_classes)
        return self.server(self.client(x))


def _check_int(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return value


def _check_width(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{name} must be a positive number, got {value!r}")
    value = float(value)
    if not (math.isfinite(value) and value > 0):
        raise ConfigError(
            f"{name} must be a finite number > 0 (it multiplies channel counts), got {value!r}"
        )
    return value


def split_backbones(
    client_net: Backbone,
    server_net: Backbone,
    *,
    cut: int,
    bottleneck_channels: int | None = 8,
    bottleneck_stride: int = 1,
    bottleneck_relu: bool = False,
    activation: str = "sigmoid",
) -> tuple[nn.Sequential, nn.Sequential, tuple[int, int, int]]:
    """Cut two builds of one architecture into (client, server, feature_shape).

    The client takes ``client_net.layers[:cut]``, the server ``server_net.layers[cut:]`` and
    its head; the two nets may differ in width, not in layout. ``cut`` must already be valid.
    New modules (bottleneck, decompression) get the reference initialisation.
    """
    c_cut, size = client_net.channels[cut - 1], client_net.sizes[cut - 1]
    c_cut_server = server_net.channels[cut - 1]
    client = OrderedDict[str, nn.Module](features=nn.Sequential(*client_net.layers[:cut]))
    server = OrderedDict[str, nn.Module]()
    feature_shape = _join(client, server, c_cut, c_cut_server, size,
                          bottleneck_channels=bottleneck_channels,
                          bottleneck_stride=bottleneck_stride, bottleneck_relu=bottleneck_relu,
                          activation=activation)
    server["features"] = nn.Sequential(*server_net.layers[cut:])
    server["head"] = server_net.head
    return nn.Sequential(client), nn.Sequential(server), feature_shape


def _join(
    client: OrderedDict[str, nn.Module],
    server: OrderedDict[str, nn.Module],
    c_cut: int,
    c_cut_server: int,
    size: int,
    *,
    bottleneck_channels: int | None,
    bottleneck_stride: int,
    bottleneck_relu: bool,
    activation: str,
) -> tuple[int, int, int]:
    """Append the bottleneck and activation to ``client`` and the decompression (or a width
    adapter) to ``server``, around a cut whose output is (c_cut, size, size) on the client
    and has c_cut_server channels on the server; returns the features' shape."""
    act = ACTIVATIONS.get(activation)()
    if bottleneck_channels is None:
        feature_shape = (c_cut, size, size)
        if c_cut != c_cut_server:  # widths differ: adapt the channel count
            server["decompress"] = nn.Sequential(
                nn.Conv2d(c_cut, c_cut_server, 3, padding=1),
                nn.BatchNorm2d(c_cut_server),
                nn.ReLU(inplace=True),
            )
    else:
        s = bottleneck_stride
        out_size = (size - 1) // s + 1  # conv3x3, padding 1, stride s
        feature_shape = (bottleneck_channels, out_size, out_size)
        client["bottleneck"] = nn.Conv2d(c_cut, bottleneck_channels, 3, stride=s, padding=1)
        if bottleneck_relu:
            client["bottleneck_relu"] = nn.ReLU(inplace=True)
        if s == 1:
            up: nn.Module = nn.Conv2d(bottleneck_channels, c_cut_server, 3, padding=1)
        else:
            # output_padding in [0, s-1] makes the transposed conv land exactly on `size`,
            # also for odd sizes (7 -> 4 -> 7 on 28x28 inputs).
            up = nn.ConvTranspose2d(
                bottleneck_channels, c_cut_server, 3, stride=s, padding=1,
                output_padding=size - 1 - (out_size - 1) * s,
            )
        server["decompress"] = nn.Sequential(
            up, nn.BatchNorm2d(c_cut_server), nn.ReLU(inplace=True)
        )
    client["activation"] = act
    for new in (client.get("bottleneck"), server.get("decompress")):
        if new is not None:
            new.apply(init_weights)
    return feature_shape


def _build_net(arch: str, width: float, **common: int) -> nn.Module:
    """Call the registered factory with the arguments it accepts (a third-party model may
    take no ``width`` or ``image_size``); a width other than 1 needs a ``width`` argument."""
    params = inspect.signature(MODELS.get(arch)).parameters
    takes_all = any(p.kind is p.VAR_KEYWORD for p in params.values())
    kwargs: dict[str, Any] = {k: v for k, v in common.items() if takes_all or k in params}
    if takes_all or "width" in params:
        kwargs["width"] = width
    elif width != 1.0:
        raise ConfigError(f"model {arch!r} takes no width argument; leave client_width and "
                          "server_width at 1")
    net = MODELS.create(arch, **kwargs)
    if not isinstance(net, nn.Module):
        raise ConfigError(f"model {arch!r} must build an nn.Module, got {type(net).__name__}")
    return net


def split_module(
    client_net: nn.Module,
    server_net: nn.Module,
    *,
    cut: str,
    example: Tensor,
    bottleneck_channels: int | None = 8,
    bottleneck_stride: int = 1,
    bottleneck_relu: bool = False,
    activation: str = "sigmoid",
) -> tuple[nn.Sequential, nn.Sequential, tuple[int, int, int]]:
    """:func:`split_backbones` for any chain-shaped model: cut at the module named ``cut``
    with :func:`splitcem.split` (checked on ``example``), then add the same bottleneck,
    activation and decompression around the cut."""
    from splitcem.models._trace import eval_no_grad as _eval_no_grad
    from splitcem.models.cut import split

    c_part, s_part = split(client_net, cut, example=example)
    s_shape = None
    if server_net is not client_net:
        c_srv, s_part = split(server_net, cut, example=example)
        with _eval_no_grad(c_srv):
            s_shape = tuple(c_srv(example).shape[1:])
    with _eval_no_grad(c_part):
        shape = tuple(c_part(example).shape[1:])
    if len(shape) != 3 or shape[1] != shape[2]:
        raise ConfigError(f"the cut {cut!r} gives features of shape {shape}; a run needs "
                          "square image-like features (C, H, H): cut before any flatten")
    c_cut_server = s_shape[0] if s_shape is not None else shape[0]
    client = OrderedDict[str, nn.Module](features=c_part)
    server = OrderedDict[str, nn.Module]()
    feature_shape = _join(client, server, shape[0], c_cut_server, shape[1],
                          bottleneck_channels=bottleneck_channels,
                          bottleneck_stride=bottleneck_stride, bottleneck_relu=bottleneck_relu,
                          activation=activation)
    server["features"] = s_part
    return nn.Sequential(client), nn.Sequential(server), feature_shape


def create_split_model(
    arch: str,
    *,
    num_classes: int,
    in_channels: int = 3,
    image_size: int = 32,
    cut: int | str = 4,
    bottleneck_channels: int | None = 8,
    bottleneck_stride: int = 1,
    bottleneck_relu: bool = False,
    activation: str = "sigmoid",
    client_width: float = 1.0,
    server_width: float = 1.0,
) -> SplitModel:
    """Build a registered architecture and cut it into client encoder and server tail.

    Args:
        arch: A name from :func:`list_models` (``vgg11_bn``, ``vgg13_bn``, ``vgg16_bn``,
            ``resnet20``).
        num_classes: Number of logits.
        in_channels: Image channels (1 for grayscale).
        image_size: Image height = width.
        cut: Number of backbone layers on the client, from 1 to the architecture's layer
            count (a VGG config entry, or a ResNet stem / basic block). For a registered
            model that is not a :class:`Backbone` (any chain-shaped ``nn.Module``, e.g. from
            a plugin), the name of the client's last module, as for :func:`splitcem.split`.
        bottleneck_channels: Channels of the client's bottleneck conv3x3; None for none.
        bottleneck_stride: Stride of the bottleneck conv; the server restores the resolution
            with a transposed conv.
        bottleneck_relu: ReLU after the bottleneck conv (the reference's C8S1 has none).
        activation: Client output activation: "sigmoid", "tanh" or "none".
        client_width: Channel multiplier of the client's layers.
        server_width: Channel multiplier of the server's layers.

    Returns:
        The :class:`SplitModel`, initialised as in the reference (deterministic under
        ``torch.manual_seed``).

    Raises:
        UnknownNameError: ``arch`` or ``activation`` is not registered.
        ConfigError: a value is out of range (the message gives the valid range).

    Example:
        >>> m = create_split_model("vgg11_bn", num_classes=10)
        >>> m.feature_shape, m.num_client_params()
        ((8, 8, 8), 85256)
    """
    MODELS.get(arch)  # raises UnknownNameError listing the known names
    ACTIVATIONS.get(activation)
    num_classes = _check_int("num_classes", num_classes, 1)
    in_channels = _check_int("in_channels", in_channels, 1)
    image_size = _check_int("image_size", image_size, 1)
    if not isinstance(cut, str):
        cut = _check_int("cut", cut, 1)
    if bottleneck_channels is not None:
        bottleneck_channels = _check_int("bottleneck_channels", bottleneck_channels, 1)
    bottleneck_stride = _check_int("bottleneck_stride", bottleneck_stride, 1)
    if not isinstance(bottleneck_relu, bool):
        raise ConfigError(f"bottleneck_relu must be true or false, got {bottleneck_relu!r}")
    if bottleneck_channels is None and (bottleneck_stride != 1 or bottleneck_relu):
        raise ConfigError(
            "bottleneck_stride and bottleneck_relu need a bottleneck; set bottleneck_channels "
            "(e.g. 8) or leave them at 1 / false"
        )
    client_width = _check_width("client_width", client_width)
    server_width = _check_width("server_width", server_width)

    common = dict(num_classes=num_classes, in_channels=in_channels, image_size=image_size)
    client_net = _build_net(arch, client_width, **common)
    server_net: nn.Module
    if not isinstance(client_net, Backbone):  # a third-party model: cut by name
        if not isinstance(cut, str):
            raise ConfigError(f"model {arch!r} is not a splitcem Backbone: cut must name the "
                              "client's last module (see splitcem.cut_points)")
        server_net = (client_net if server_width == client_width
                      else _build_net(arch, server_width, **common))
        from splitcem.models._trace import eval_no_grad as _eval_no_grad

        # random-normal inputs: a constant batch would hide ReLUs and skips from the check
        example = torch.randn(2, in_channels, image_size, image_size,
                              generator=torch.Generator().manual_seed(0))
        client, server, feature_shape = split_module(
            client_net, server_net, cut=cut, example=example,
            bottleneck_channels=bottleneck_channels, bottleneck_stride=bottleneck_stride,
            bottleneck_relu=bottleneck_relu, activation=activation)
        whole = nn.Sequential(client, server)
        with _eval_no_grad(whole):
            out = whole(example)
        if out.shape != (2, num_classes):
            raise ConfigError(f"model {arch!r} outputs shape {tuple(out.shape[1:])} per "
                              f"image; the data has {num_classes} classes")
        return SplitModel(client, server, feature_shape=feature_shape, config=dict(
            arch=arch, num_classes=num_classes, in_channels=in_channels,
            image_size=image_size, cut=cut, bottleneck_channels=bottleneck_channels,
            bottleneck_stride=bottleneck_stride, bottleneck_relu=bottleneck_relu,
            activation=activation, client_width=client_width, server_width=server_width))
    if isinstance(cut, str):
        raise ConfigError(f"cut={cut!r}: for {arch!r} cut is the number of backbone layers "
                          f"on the client (an integer from 1 to {len(client_net)})")
    n = len(client_net)
    if cut > n:
        layers = ", ".join(f"{i + 1}={name}" for i, name in enumerate(client_net.names))
        raise ConfigError(
            f"cut={cut} is out of range for {arch}: it has {n} cuttable layers, so cut must "
            f"be an integer in [1, {n}] (layers: {layers})"
        )
    # Same width: one build serves both sides. Otherwise the server's layers come from a
    # second build at its width (the unused half of each build is dropped).
    server_net = (
        client_net if server_width == client_width
        else _build_net(arch, server_width, **common)
    )
    assert isinstance(server_net, Backbone)
    client, server, feature_shape = split_backbones(
        client_net,
        server_net,
        cut=cut,
        bottleneck_channels=bottleneck_channels,
        bottleneck_stride=bottleneck_stride,
        bottleneck_relu=bottleneck_relu,
        activation=activation,
    )
    config = dict(
        arch=arch,
        num_classes=num_classes,
        in_channels=in_channels,
        image_size=image_size,
        cut=cut,
        bottleneck_channels=bottleneck_channels,
        bottleneck_stride=bottleneck_stride,
        bottleneck_relu=bottleneck_relu,
        activation=activation,
        client_width=client_width,
        server_width=server_width,
    )
    return SplitModel(client, server, feature_shape=feature_shape, config=config)

