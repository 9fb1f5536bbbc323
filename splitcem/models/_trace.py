"""How :func:`splitcem.split` reads a model's forward: hooks on every module, on inputs that
exercise it, in eval and in train mode.

A container is a *chain* when its forward runs its children one after the other, each
child's output the next child's input (``torch.flatten(x, 1)`` between two children is
recognised). ``nn.Sequential`` is a chain by definition (its registered children in order,
a reused instance included). Any other container is checked by running the model
(:func:`trace`) on the user's example batch and on seeded random-normal inputs of its shape,
once in eval mode and once in train mode under a fixed RNG (so ReLUs, skips and functional
dropout that one input or one mode hides show up), with the model's BatchNorm statistics
and modes restored afterwards. It must be a chain in every run. Refused as chains: a
container whose forward calls a child twice (a reused module), one that owns parameters or
buffers itself (its forward uses them outside its children), and one whose children do
not hand their outputs on (a skip connection, a functional op).
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from splitcem.errors import CutPointError

__all__ = ["Node", "eval_no_grad", "fixed_rng", "is_sequential", "run_modes", "same",
           "sequential_nodes", "trace", "trace_inputs"]

#: the seed of the random inputs and of the train-mode RNG
SEED = 0
#: random-normal inputs the chain check adds to the user's example
RANDOM_INPUTS = 2


@dataclass
class Node:
    """A module in the model tree, with what the traced forward recorded about it."""

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


def is_sequential(m: nn.Module) -> bool:
    """An ``nn.Sequential`` whose forward is Sequential's own (a chain by definition)."""
    return isinstance(m, nn.Sequential) and type(m).forward is nn.Sequential.forward


def children(m: nn.Module) -> list[tuple[str, nn.Module]]:
    """Registered children in order, a module registered twice listed twice."""
    return [(n, c) for n, c in m._modules.items() if c is not None]


def child_name(parent: str, child: str) -> str:
    return f"{parent}.{child}" if parent else child


def same(a: Tensor, b: Tensor) -> bool:
    """Exactly equal (shape, dtype, values)."""
    return a.shape == b.shape and a.dtype == b.dtype and bool(torch.equal(a, b))


@contextlib.contextmanager
def _modes(model: nn.Module, train: bool) -> Iterator[None]:
    """``train`` or eval mode and no grad; modes and buffers (BN statistics) restored."""
    saved = [(m, m.training) for m in model.modules()]
    bufs = [(b, b.detach().clone()) for b in model.buffers()] if train else []
    try:
        model.train(train)
        with torch.no_grad():
            yield
    finally:
        for m, was in saved:
            m.training = was
        with torch.no_grad():
            for b, v in bufs:
                b.copy_(v)


def eval_no_grad(model: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Eval mode (no dropout, BN running statistics untouched) and no grad; modes restored."""
    return _modes(model, False)


@contextlib.contextmanager
def fixed_rng(device: torch.device) -> Iterator[None]:
    """Run under a fixed seed (dropout draws repeat); the global RNG state is restored."""
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(SEED)
        yield


def trace_inputs(example: Tensor) -> list[Tensor]:
    """The user's example (unless constant) and seeded random-normal inputs of its shape."""
    inputs = [example]
    if example.is_floating_point():
        shape = (max(2, example.shape[0]), *example.shape[1:])
        gen = torch.Generator().manual_seed(SEED)
        rand = [torch.randn(shape, generator=gen).to(example.device, example.dtype)
                for _ in range(RANDOM_INPUTS)]
        if example.numel() and bool((example == example.flatten()[0]).all()):
            warnings.warn(
                "split: the example batch is constant (e.g. torch.zeros), which hides "
                "ReLUs and skip connections from the chain check; checking on seeded "
                "random-normal inputs of its shape instead (pass a real batch to check on it)",
                stacklevel=3)
            inputs = []
        inputs += rand
    return inputs


def run_modes(model: nn.Module, x: Tensor, fn: Any) -> list[Tensor]:
    """``fn(x)`` in eval mode and in train mode under a fixed RNG (model restored)."""
    outs = []
    for train in (False, True):
        with _modes(model, train), fixed_rng(x.device):
            outs.append(fn(x))
    return outs


def _record(model: nn.Module, x: Tensor, train: bool) -> tuple[dict[str, Node], Any]:
    """Run ``model(x)`` once, recording each module's first input and output."""
    nodes = {name: Node(name, m) for name, m in model.named_modules(remove_duplicate=False)}
    order: list[str] = []  # first-call order
    handles = []

    def pre(node: Node) -> Any:
        def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            node.calls += 1
            if node.calls == 1:
                order.append(node.name)
                if len(args) == 1 and not kwargs and isinstance(args[0], Tensor):
                    node.inp = args[0].detach().clone()  # before any in-place op touches it

        return hook

    def post(node: Node) -> Any:
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
        with _modes(model, train), fixed_rng(x.device):
            out = model(x)
    finally:
        for h in handles:
            h.remove()
    rank = {n: i for i, n in enumerate(order)}
    for node in nodes.values():
        _analyse(node, nodes, rank)
    return nodes, out


def _own_state(m: nn.Module) -> list[str]:
    return [n for n, v in [*m._parameters.items(), *m._buffers.items()] if v is not None]


def _analyse(node: Node, nodes: dict[str, Node], rank: dict[str, int]) -> None:
    """Decide whether ``node``'s forward is the chain of its (called) children."""
    kids = children(node.module)
    if not kids:
        return
    if is_sequential(node.module):
        node.chain, node.flat = kids, [False] * len(kids)
        return
    own = _own_state(node.module)
    if own:
        node.why_not = (f"it owns parameters or buffers itself ({', '.join(own)}), which its "
                        "forward uses outside its children; move them into a child module")
        return
    if node.calls != 1:
        node.why_not = "it is called more than once (or never) in the forward"
        return
    if node.inp is None or node.out is None:
        node.why_not = "its input or output is not a single tensor"
        return
    called = [(n, m) for n, m in kids if nodes[child_name(node.name, n)].calls > 0]
    called.sort(key=lambda nm: rank[child_name(node.name, nm[0])])
    if not called:
        node.why_not = "none of its children run in the forward"
        return
    if len({id(m) for _, m in called}) != len(called):
        node.why_not = "one module instance is registered under two names in it"
        return
    flat = [False]
    prev = node.inp
    for i, (n, _m) in enumerate(called):
        child = nodes[child_name(node.name, n)]
        if child.calls != 1:
            node.why_not = (f"its child {n!r} is called {child.calls} times (a module "
                            "instance reused in the forward; give each use its own module)")
            return
        if child.inp is None or child.out is None:
            node.why_not = f"its child {n!r} is not called on one tensor"
            return
        if same(prev, child.inp):
            if i:
                flat.append(False)
        elif i and prev.dim() > 2 and same(prev.flatten(1), child.inp):
            flat.append(True)  # torch.flatten(x, 1) between the two children
        else:
            node.why_not = (f"its child {n!r} does not receive the previous child's output "
                            "(a skip connection or a functional op in the forward)")
            return
        prev = child.out
    if not same(prev, node.out):
        node.why_not = ("its output is not its last child's output (the forward does "
                        "more after its children)")
        return
    node.chain, node.flat = called, flat


def trace(model: nn.Module, example: Tensor) -> dict[str, Node]:
    """The model tree with each container's chain, from forwards on inputs that exercise
    it (:func:`trace_inputs`) in eval and train mode; shapes are from the eval forward on
    the first of them. A container is a chain only if it is one, the same, in every run."""
    runs: list[tuple[str, dict[str, Node]]] = []
    for k, x in enumerate(trace_inputs(example)):
        for train in (False, True):
            nodes, out = _record(model, x, train)
            if not isinstance(out, Tensor):
                raise CutPointError(
                    f"{type(model).__name__}(example) returned {type(out).__name__}, not a "
                    "tensor; split needs a model that maps a batch of inputs to one tensor")
            what = ("the example" if k == 0 and x is example else "a random-normal input")
            runs.append((f"{what}, {'train' if train else 'eval'} mode", nodes))
    first = runs[0][1]
    for name, node in first.items():
        for where, other in runs[1:]:
            o = other[name]
            if node.chain is None:
                break
            names = [n for n, _ in o.chain] if o.chain is not None else None
            if names != [n for n, _ in node.chain] or o.flat != node.flat:
                node.chain, node.flat = None, []
                node.why_not = (o.why_not or "its children run in another order") + \
                    f" (seen on {where})"
    return first


def sequential_nodes(model: nn.Module) -> dict[str, Node]:
    """Without an example: only ``nn.Sequential`` containers are known chains."""
    nodes = {name: Node(name, m) for name, m in model.named_modules(remove_duplicate=False)}
    for node in nodes.values():
        kids = children(node.module)
        if not kids:
            continue
        if is_sequential(node.module):
            node.chain, node.flat = kids, [False] * len(kids)
        else:
            node.why_not = (f"it is a {type(node.module).__name__}, not an nn.Sequential, so "
                            "its forward cannot be read without running it: pass example=")
    return nodes
