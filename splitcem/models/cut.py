"""Cut any chain-shaped PyTorch model into a client encoder and a server tail.

``split(model, at="features.7")`` returns ``(client, server)`` with
``server(client(x)) == model(x)``, for models whose forward runs their children one after
the other: ``nn.Sequential`` (nested or not) and models with named blocks
(``features`` -> ``torch.flatten`` -> ``classifier``). The halves are ``nn.Sequential`` s that
*share* the model's modules (no copy: training either trains the model) and keep their
names, so ``client.state_dict()`` keys are the model's own (``features.0.weight``).

How a model is read. An ``nn.Sequential`` is a chain by definition. Any other container is a
chain only if its forward is: ``cut_points(model, example)`` (and ``split(..., example=x)``)
runs ``model(x)`` once with hooks that record every module's input and output, and accepts a
container as a chain when its children, in the order they were called, pass each output on
as the next input (``torch.flatten(x, 1)`` between two children is recognised and kept as an
``nn.Flatten`` on the server side), from the container's input to its output. A residual
block fails that test and stays one indivisible layer; cutting inside it is an error that
lists the valid cut points with their output shapes.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass

from torch import Tensor, nn

from splitcem.errors import CutPointError
from splitcem.models._trace import Node as _Node
from splitcem.models._trace import child_name as _child_name
from splitcem.models._trace import is_sequential as _is_sequential
from splitcem.models._trace import run_modes, same, sequential_nodes, trace, trace_inputs

__all__ = ["CutPoint", "cut_points", "split"]

#: at most this many cut points are listed in an error message
_LIST_LIMIT = 60


@dataclass(frozen=True)
class CutPoint:
    """A place ``split`` can cut: after module ``name``.

    Attributes:
        name: Dotted module name (``model.get_submodule(name)``), the ``at`` of :func:`split`.
        shape: Shape of that module's output without the batch dimension, i.e. of the
            features the client would send (empty when found without an example input).
        client_parameters: Parameters the client would hold.
    """

    name: str
    shape: tuple[int, ...] = ()
    client_parameters: int = 0

    def __str__(self) -> str:
        shape = " x ".join(map(str, self.shape)) if self.shape else "?"
        return f"{self.name} -> {shape} ({self.client_parameters:,} client parameters)"


def _enumerate(
    nodes: dict[str, _Node], name: str = "", ends: bool = True
) -> Iterator[tuple[str, bool]]:
    """(cut name, whether cutting there ends the whole model), in forward order; ``ends``
    says whether the end of container ``name`` is the end of the model."""
    node = nodes[name]
    if node.chain is None:
        return
    for i, (n, _m) in enumerate(node.chain):
        full = _child_name(name, n)
        last = ends and i == len(node.chain) - 1
        yield from _enumerate(nodes, full, last)
        yield full, last


def _valid(nodes: dict[str, _Node]) -> list[str]:
    """Valid cut names: those that leave the server something to do."""
    return [full for full, ends_model in _enumerate(nodes) if not ends_model]


def _points(model: nn.Module, nodes: dict[str, _Node], names: list[str]) -> list[CutPoint]:
    pts = []
    for n in names:
        out = nodes[n].out
        client = _build(model, nodes, n)[0]
        pts.append(CutPoint(n, tuple(out.shape[1:]) if out is not None else (),
                            sum(p.numel() for p in client.parameters())))
    return pts


def cut_points(model: nn.Module, example: Tensor) -> list[CutPoint]:
    """Every place ``model`` can be cut, in forward order, with the features' shapes.

    Args:
        model: Any ``nn.Module``; see the module docstring for what counts as a chain.
        example: A real batch of inputs, e.g. ``next(iter(loader))[0][:8]``. The forward
            runs on it and on seeded random-normal inputs of its shape, in eval and in train
            mode, without gradients; the model's modes and BatchNorm statistics are restored.
            A constant batch (``torch.zeros``) is replaced by the random inputs, with a
            warning.

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> [str(p) for p in cut_points(net, torch.rand(2, 3, 4, 4))][:2]
        ['0 -> 4 x 2 x 2 (112 client parameters)', '1 -> 4 x 2 x 2 (112 client parameters)']
    """
    nodes = trace(model, example)
    return _points(model, nodes, _valid(nodes))


def _explain(model: nn.Module, nodes: dict[str, _Node], at: str, example: Tensor | None) -> str:
    """Why ``at`` is not a valid cut, and which cuts are."""
    valid = _valid(nodes)
    if at not in nodes or not at:
        why = f"{type(model).__name__} has no submodule named {at!r}"
    else:
        parts = at.split(".")
        why = f"{at!r} ends the model: the server would get nothing to run"
        for k in range(len(parts)):
            parent = ".".join(parts[:k])
            pnode = nodes[parent]
            if pnode.chain is None:
                what = f"{parent!r}" if parent else f"the model ({type(model).__name__})"
                why = f"{at!r} is inside {what}, whose forward is not a chain: {pnode.why_not}"
                break
            if parts[k] not in {n for n, _ in pnode.chain}:
                why = f"{at!r} does not run in the forward of {parent or 'the model'}"
                break
    listed = [str(p) for p in _points(model, nodes, valid)] if example is not None else valid
    more = len(listed) - _LIST_LIMIT
    lines = listed[:_LIST_LIMIT] + ([f"... and {more} more"] if more > 0 else [])
    how = ("" if example is not None else
           " (shapes: splitcem.cut_points(model, example))")
    return (f"cannot cut at {at!r}: {why}. Valid cut points{how}:\n  "
            + ("\n  ".join(lines) if lines else "(none)"))


def _build(
    model: nn.Module, nodes: dict[str, _Node], at: str
) -> tuple[nn.Sequential, nn.Sequential]:
    """The two halves for a valid cut ``at`` (modules shared, names kept)."""

    def halves(name: str, rest: list[str]) -> tuple[list[tuple[str, nn.Module]],
                                                      list[tuple[str, nn.Module]]]:
        node = nodes[name]
        assert node.chain is not None
        i = [n for n, _ in node.chain].index(rest[0])
        client: list[tuple[str, nn.Module]] = []
        for j in range(i):
            if node.flat[j]:
                client.append((_free_name(node.chain, client), nn.Flatten(1)))
            client.append(node.chain[j])
        server: list[tuple[str, nn.Module]] = []
        child_name, child = node.chain[i]
        if i and node.flat[i]:
            client.append((_free_name(node.chain, client), nn.Flatten(1)))
        if len(rest) == 1:
            client.append((child_name, child))
        else:
            c, s = halves(_child_name(name, child_name), rest[1:])
            client.append((child_name, nn.Sequential(OrderedDict(c))))
            if s:
                server.append((child_name, nn.Sequential(OrderedDict(s))))
        for j in range(i + 1, len(node.chain)):
            if node.flat[j]:  # the client sends the unflattened features
                server.append((_free_name(node.chain, server), nn.Flatten(1)))
            server.append(node.chain[j])
        return client, server

    c, s = halves("", at.split("."))
    return nn.Sequential(OrderedDict(c)), nn.Sequential(OrderedDict(s))


def _free_name(chain: list[tuple[str, nn.Module]], *more: list[tuple[str, nn.Module]]) -> str:
    """A child name for an inserted ``nn.Flatten`` that clashes with none in the chain."""
    taken = {n for n, _ in chain} | {n for m in more for n, _ in m}
    name = "flatten"
    while name in taken:
        name = "_" + name
    return name


def _check_halves(model: nn.Module, client: nn.Module, server: nn.Module, at: str,
                  example: Tensor) -> None:
    """``server(client(x))`` equals ``model(x)`` exactly on the traced inputs, in eval mode
    and in train mode (same RNG draws), or a CutPointError."""
    for x in trace_inputs(example):
        want = run_modes(model, x, model)
        got = run_modes(model, x, lambda v: server(client(v)))
        for mode, w, g in zip(("eval", "train"), want, got, strict=True):
            if not same(g, w):
                diff = float((g.float() - w.float()).abs().max()) if g.shape == w.shape else -1
                raise CutPointError(
                    f"the halves cut at {at!r} do not reproduce {type(model).__name__} in "
                    f"{mode} mode (max difference {diff:.3g}): its forward does something "
                    "the chain check cannot see; cut elsewhere or report the model")


def split(
    model: nn.Module, at: str, *, example: Tensor | None = None
) -> tuple[nn.Sequential, nn.Sequential]:
    """Cut ``model`` after the module named ``at`` into ``(client, server)``.

    Args:
        model: The whole model. An ``nn.Sequential`` (nested or not) needs nothing else; any
            other model needs ``example`` so its forward can be checked to be a chain.
        at: Dotted name of the client's last module (as in ``model.named_modules()``).
        example: A real batch of inputs (see :func:`cut_points`); when given, the halves
            are also checked to reproduce the model exactly on it and on random-normal
            inputs, in eval and in train mode.

    Returns:
        ``(client, server)``, two ``nn.Sequential`` s sharing the model's modules, with
        ``server(client(x))`` equal to ``model(x)``.

    Raises:
        CutPointError: ``at`` does not exist or cannot be cut; the message lists the valid
            cut points (with output shapes when ``example`` is given).

    Example:
        >>> import torch
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> client, server = split(net, at="1")
        >>> x = torch.randn(2, 3, 4, 4)
        >>> torch.equal(server(client(x)), net(x))
        True
    """
    if not isinstance(at, str):
        raise CutPointError(f"at must be a module name (a string such as 'features.7'), "
                            f"got {at!r}")
    if example is None and not _is_sequential(model):
        raise CutPointError(
            f"cannot cut {type(model).__name__} at {at!r} without an example input: it is not "
            "an nn.Sequential, so split must run it once to check that its forward chains its "
            "children; pass example=<a batch of inputs> (splitcem.cut_points(model, example) "
            "lists where it can be cut)"
        )
    nodes = trace(model, example) if example is not None else sequential_nodes(model)
    if at not in _valid(nodes):
        raise CutPointError(_explain(model, nodes, at, example))
    client, server = _build(model, nodes, at)
    if example is not None:
        _check_halves(model, client, server, at, example)
    return client, server
