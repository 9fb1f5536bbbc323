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

import contextlib
from collections import OrderedDict
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from splitcem.errors import CutPointError

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


@dataclass
class _Node:
    """A module in the model tree, with what the example forward recorded about it."""

    name: str  # dotted path from the root ("" for the root)
    module: nn.Module
    calls: int = 0
    inp: Tensor | None = None
    out: Tensor | None = None
    #: for a chain container: its children in call order, and whether a flatten(1) sits
    #: between child i-1 and child i (flat[0] is always False)
    chain: list[tuple[str, nn.Module]] | None = None
    flat: list[bool] = field(default_factory=list)
    why_not: str = ""  # why this container is not a chain


def _is_sequential(m: nn.Module) -> bool:
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


@contextlib.contextmanager
def _eval_no_grad(model: nn.Module) -> Iterator[None]:
    """Eval mode (no dropout, BN running statistics untouched) and no grad; modes restored."""
    saved = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            yield
    finally:
        for m, was in saved:
            m.training = was


def _record(model: nn.Module, example: Tensor) -> tuple[dict[str, _Node], Tensor]:
    """Run ``model(example)`` once, recording each module's first input and output."""
    nodes = {name: _Node(name, m) for name, m in model.named_modules(remove_duplicate=False)}
    order: list[str] = []  # first-call order
    handles = []

    def pre(node: _Node) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            node.calls += 1
            if node.calls == 1:
                order.append(node.name)
                if len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
                    node.inp = args[0].detach().clone()  # before any in-place op touches it

        return hook

    def post(node: _Node) -> Any:
        def hook(_m: nn.Module, _args: Any, out: Any) -> None:
            if node.calls == 1 and isinstance(out, Tensor):
                node.out = out.detach().clone()

        return hook

    seen: set[int] = set()
    for node in nodes.values():
        if id(node.module) in seen:  # a module registered twice: hook it once
            continue
        seen.add(id(node.module))
        handles.append(node.module.register_forward_pre_hook(pre(node), with_kwargs=True))
        handles.append(node.module.register_forward_hook(post(node)))
    try:
        with _eval_no_grad(model):
            out = model(example)
    finally:
        for h in handles:
            h.remove()
    if not isinstance(out, Tensor):
        raise CutPointError(
            f"{type(model).__name__}(example) returned {type(out).__name__}, not a tensor; "
            "split needs a model that maps a batch of inputs to one output tensor"
        )
    rank = {n: i for i, n in enumerate(order)}
    for node in nodes.values():
        _analyse(node, nodes, rank)
    return nodes, out


def _child_name(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def _analyse(node: _Node, nodes: dict[str, _Node], rank: dict[str, int]) -> None:
    """Decide whether ``node``'s forward is the chain of its (called) children."""
    children = list(node.module.named_children())
    if not children:
        return
    if node.calls != 1:
        node.why_not = "it is called more than once (or never) in the forward"
        return
    if node.inp is None or node.out is None:
        node.why_not = "its input or output is not a single tensor"
        return
    called = [(n, m) for n, m in children if nodes[_child_name(node.name, n)].calls > 0]
    called.sort(key=lambda nm: rank[_child_name(node.name, nm[0])])
    if not called:
        node.why_not = "none of its children run in the forward"
        return
    flat = [False]
    prev = node.inp
    for i, (n, _m) in enumerate(called):
        child = nodes[_child_name(node.name, n)]
        if child.calls != 1 or child.inp is None or child.out is None:
            node.why_not = f"its child {n!r} is called more than once or not on one tensor"
            return
        if _same(prev, child.inp):
            if i:
                flat.append(False)
        elif i and prev.dim() > 2 and _same(prev.flatten(1), child.inp):
            flat.append(True)  # torch.flatten(x, 1) between the two children
        else:
            node.why_not = (f"its child {n!r} does not receive the previous child's output "
                            "(a skip connection or a functional op in the forward)")
            return
        prev = child.out
    if not _same(prev, node.out):
        node.why_not = ("its output is not its last child's output (the forward does "
                        "more after its children)")
        return
    node.chain, node.flat = called, flat


def _same(a: Tensor, b: Tensor) -> bool:
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


def _sequential_nodes(model: nn.Module) -> dict[str, _Node]:
    """Without an example: only ``nn.Sequential`` containers are known chains."""
    nodes = {name: _Node(name, m) for name, m in model.named_modules(remove_duplicate=False)}
    for node in nodes.values():
        children = list(node.module.named_children())
        if not children:
            continue
        if _is_sequential(node.module):
            node.chain, node.flat = children, [False] * len(children)
        else:
            node.why_not = (f"it is a {type(node.module).__name__}, not an nn.Sequential, so "
                            "its forward cannot be read without running it: pass example=")
    return nodes


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
        example: A batch of inputs, e.g. ``torch.zeros(2, 3, 32, 32)`` (run once in eval
            mode, without gradients; the model's modes are restored).

    Example:
        >>> net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(16, 2))
        >>> [str(p) for p in cut_points(net, torch.zeros(1, 3, 4, 4))][:2]
        ['0 -> 4 x 2 x 2 (112 client parameters)', '1 -> 4 x 2 x 2 (112 client parameters)']
    """
    nodes, _ = _record(model, example)
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


def split(
    model: nn.Module, at: str, *, example: Tensor | None = None
) -> tuple[nn.Sequential, nn.Sequential]:
    """Cut ``model`` after the module named ``at`` into ``(client, server)``.

    Args:
        model: The whole model. An ``nn.Sequential`` (nested or not) needs nothing else; any
            other model needs ``example`` so its forward can be checked to be a chain.
        at: Dotted name of the client's last module (as in ``model.named_modules()``).
        example: A batch of inputs; when given, the halves are also checked to reproduce
            ``model(example)`` exactly.

    Returns:
        ``(client, server)``, two ``nn.Sequential`` s sharing the model's modules, with
        ``server(client(x))`` equal to ``model(x)``.

    Raises:
        CutPointError: ``at`` does not exist or cannot be cut; the message lists the valid
            cut points (with output shapes when ``example`` is given).

    Example:
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
    nodes = _record(model, example)[0] if example is not None else _sequential_nodes(model)
    if at not in _valid(nodes):
        raise CutPointError(_explain(model, nodes, at, example))
    client, server = _build(model, nodes, at)
    if example is not None:
        with _eval_no_grad(model):
            want = model(example)
            got = server(client(example))
        if not _same(got, want):  # pragma: no cover - the chain analysis guarantees it
            raise CutPointError(
                f"the halves cut at {at!r} do not reproduce {type(model).__name__}(example); "
                "please report this with the model's definition"
            )
    return client, server
