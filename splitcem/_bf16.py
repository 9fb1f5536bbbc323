"""bf16 autocast where the CPU has no bf16 units: float32 kernels on bf16-rounded operands.

What bf16 autocast computes for a convolution or a matmul: its floating operands (input,
weight, bias) rounded to bfloat16, products summed in float32, the result rounded to
bfloat16. Where the CPU has AVX512-BF16 or AMX, oneDNN's bf16 kernels sum in float32
accumulators (``tests/test_bf16.py`` checks them against the oracle below where it runs on
such a CPU). Where it has not, PyTorch's own bf16 kernels are a slow fallback: on an AVX2 AMD
EPYC a training step of the zoo's bottleneck model took 9.19 s against 0.73 s in float32 (one
thread, batch 128, channels-last: ``benchmarks/bf16_emulation.py``), and they round partial
sums to bf16 in a convolution's gradients.

:class:`Bf16ViaFloat32` computes it another way: it rounds the operands to bfloat16, runs
the float32 kernel on them (a product of two bf16 numbers is exact in float32, and the sum is
float32), and rounds the result to bfloat16; the gradients come out rounded to bfloat16 too,
through the casts' own backward. ``tests/test_bf16.py`` holds it (and PyTorch's kernels) to
an oracle, :func:`exact_bf16`: exact arithmetic on the bf16-rounded operands, rounded
once. It meets it on all but the rare element where float32 sums in another order round to
the neighbouring bf16 number; PyTorch's fallback on AVX2 meets it on about half the elements
of a convolution's gradients.

It covers the ops bf16 autocast lowers that splitcem's models, decoders and losses call
(:data:`EMULATED`); any other op falls through to autocast unchanged, so coverage changes
speed only, never what is computed. It acts only while CPU autocast to bfloat16 is on, so
code that switches autocast off inside (the adversarial defense's float32 decoder) runs
float32 as before.
"""

from __future__ import annotations

import copy
from contextlib import AbstractContextManager
from types import TracebackType
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

__all__ = ["EMULATED", "Bf16ViaFloat32", "bf16_autocast", "exact_bf16"]

#: The ops bf16 autocast runs in bfloat16 that :class:`Bf16ViaFloat32` runs as float32
#: kernels on bf16-rounded operands (functions and the tensor methods that reach them).
EMULATED: frozenset[Any] = frozenset({
    F.conv1d, F.conv2d, F.conv3d,
    F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
    F.linear, torch.matmul, torch.mm, torch.bmm,
    torch.Tensor.matmul, torch.Tensor.__matmul__, torch.Tensor.mm, torch.Tensor.bmm,
})


def _round(x: Any) -> Any:
    """A floating tensor rounded to bfloat16 and held as float32; anything else as it is."""
    if isinstance(x, torch.Tensor) and x.is_floating_point():
        return x.to(torch.bfloat16).float()
    return x


class Bf16ViaFloat32(TorchFunctionMode):
    """While CPU autocast to bfloat16 is on, run :data:`EMULATED` ops as float32 kernels on
    bf16-rounded operands and round their results to bfloat16 (the module docstring says
    why this is bf16 autocast's arithmetic)."""

    def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (),
                           kwargs: dict[str, Any] | None = None) -> Any:
        kwargs = kwargs or {}
        if func in EMULATED and torch.is_autocast_enabled("cpu") \
                and torch.get_autocast_dtype("cpu") == torch.bfloat16:
            args = tuple(_round(a) for a in args)
            kwargs = {k: _round(v) for k, v in kwargs.items()}
            with torch.autocast("cpu", enabled=False):
                return func(*args, **kwargs).to(torch.bfloat16)
        return func(*args, **kwargs)


class _Bf16Autocast:
    """CPU bf16 autocast with :class:`Bf16ViaFloat32` inside; reusable like
    :class:`torch.autocast` (entered again after each exit, not nested in itself)."""

    def __init__(self) -> None:
        self._autocast = torch.autocast("cpu", dtype=torch.bfloat16)
        self._mode = Bf16ViaFloat32()

    def __enter__(self) -> None:
        self._autocast.__enter__()
        self._mode.__enter__()

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._mode.__exit__(kind, exc, tb)
        self._autocast.__exit__(kind, exc, tb)


def bf16_autocast(device: str, *, via_float32: bool) -> AbstractContextManager[Any]:
    """bf16 autocast on ``device``; with ``via_float32`` (CPU only) its convolutions and
    matmuls run as :class:`Bf16ViaFloat32` computes them."""
    if via_float32 and device == "cpu":
        return _Bf16Autocast()
    return torch.autocast(device, dtype=torch.bfloat16)


def exact_bf16(layer: nn.Module, x: torch.Tensor, upstream: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The oracle bf16 autocast is held to: ``layer``'s output, input gradient and weight
    gradient in exact (float64) arithmetic on bf16-rounded input and parameters, each
    rounded to bfloat16 once (``upstream``: the output's gradient as the backward pass under
    autocast gets it). ``layer`` is left as it was; gradients come back as float32."""
    exact = copy.deepcopy(layer).double()
    for p in exact.parameters():
        p.data, p.grad = p.data.to(torch.bfloat16).double(), None
    xx = x.detach().to(torch.bfloat16).double().requires_grad_()
    y = exact(xx)
    y.backward(upstream.double())
    weight = getattr(exact, "weight", None)
    if xx.grad is None or not isinstance(weight, torch.Tensor) or weight.grad is None:
        raise ValueError(f"{type(layer).__name__} has no weight gradient to compare")
    return (y.detach().to(torch.bfloat16), xx.grad.to(torch.bfloat16).float(),
            weight.grad.to(torch.bfloat16).float())
