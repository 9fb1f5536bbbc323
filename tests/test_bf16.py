"""bf16 autocast via float32 kernels (splitcem._bf16) against an oracle.

The oracle is what bf16 autocast defines: the operands rounded to bf16, the arithmetic exact
(float64 here), the result rounded to bf16 once. Float32 sums of exact products agree with it
except for the rare element where the two sums round to neighbouring bf16 numbers. Two things
it would catch: operands not rounded (float32 on the raw tensors agrees on about half the
elements) and partial sums rounded to bf16 (PyTorch's own bf16 kernels on a CPU without bf16
units do that in convolutions' gradients: about half the elements, asserted below so that a
torch that stops doing it is noticed rather than silently compared against).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from splitcem._bf16 import EMULATED, Bf16ViaFloat32, bf16_autocast, exact_bf16
from splitcem.runtime import bf16_kernels, native_bf16, resolve_numeric_path

BF16 = torch.bfloat16


def _layers() -> dict[str, tuple[nn.Module, torch.Tensor]]:
    torch.manual_seed(0)
    return {"conv2d": (nn.Conv2d(32, 48, 3, padding=1), torch.randn(4, 32, 12, 12)),
            "conv_transpose2d": (nn.ConvTranspose2d(32, 16, 4, stride=2, padding=1),
                                 torch.randn(4, 32, 8, 8)),
            "linear": (nn.Linear(96, 40), torch.randn(16, 96))}


def _same(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a == b).float().mean().item()


def _run(layer: nn.Module, x: torch.Tensor, ctx: contextlib.AbstractContextManager[object]
         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Output, its gradient as the backward pass gets it, input and weight gradients of
    ``(y ** 2).mean()`` under ``ctx``."""
    layer.zero_grad()
    xx = x.clone().requires_grad_()
    with ctx:
        y = layer(xx)
    y.retain_grad()
    (y.float() ** 2).mean().backward()
    assert xx.grad is not None and layer.weight.grad is not None and y.grad is not None
    return y.detach(), y.grad, xx.grad, layer.weight.grad.clone()


@pytest.mark.parametrize("name", ["conv2d", "conv_transpose2d", "linear"])
def test_matches_exact_arithmetic_on_bf16_operands(name):
    layer, x = _layers()[name]
    y, up, gx, gw = _run(layer, x, bf16_autocast("cpu", via_float32=True))
    assert y.dtype == up.dtype == BF16
    for g in (gx, gw):  # float32 tensors holding bf16 numbers, as autocast's casts leave them
        assert g.dtype == torch.float32 and torch.equal(g, g.to(BF16).float())
    want = exact_bf16(layer, x, up)
    for got, exact in zip((y, gx, gw), want, strict=True):
        assert _same(got, exact) > 0.999
    # the mutant this guards against: float32 on the raw operands, rounded at the end
    assert _same(layer(x).to(BF16), want[0]) < 0.9


def test_torch_bf16_kernels_here_round_partial_sums():
    """Why not PyTorch's own kernels, besides speed: where bf16 is not native they round
    partial sums (gradients of a convolution) and miss the oracle on about half the elements;
    where it is native they match it like ours (the last test)."""
    if native_bf16("cpu"):
        pytest.skip("this CPU has bf16 units: torch's kernels are the native ones here")
    layer, x = _layers()["conv2d"]
    _, up, gx, gw = _run(layer, x, torch.autocast("cpu", dtype=BF16))
    _, ex, ew = exact_bf16(layer, x, up)
    assert _same(gx, ex) < 0.9 and _same(gw, ew) < 0.9


def test_only_while_cpu_autocast_bf16_is_on():
    layer, x = _layers()["conv2d"]
    with Bf16ViaFloat32():  # no autocast: float32 throughout
        assert layer(x).dtype == torch.float32
    with bf16_autocast("cpu", via_float32=True):
        with torch.autocast("cpu", enabled=False):  # what the adversarial decoder does
            assert layer(x).dtype == torch.float32
        assert layer(x).dtype == BF16


def test_matmul_forms_are_emulated():
    torch.manual_seed(1)
    a, b = torch.randn(3, 20, 30), torch.randn(3, 30, 10)
    with torch.autocast("cpu", dtype=BF16):
        want = a @ b
    seen: list[object] = []

    class Spy(Bf16ViaFloat32):
        def __torch_function__(self, func, types, args=(), kwargs=None):
            seen.append(func)
            return super().__torch_function__(func, types, args, kwargs)

    with torch.autocast("cpu", dtype=BF16), Spy():
        forms = [a @ b, torch.matmul(a, b), torch.bmm(a, b), a.bmm(b), a.matmul(b)]
    for got in forms:
        assert got.dtype == BF16 and (got == want).float().mean().item() > 0.99
    assert len(seen) == len(forms) and all(f in EMULATED for f in seen)  # `@` included


_CALLS = {  # one small call per emulated op: (function, arguments)
    F.conv1d: (torch.randn(2, 4, 9), torch.randn(6, 4, 3)),
    F.conv2d: (torch.randn(2, 4, 7, 7), torch.randn(6, 4, 3, 3)),
    F.conv3d: (torch.randn(1, 2, 5, 5, 5), torch.randn(3, 2, 3, 3, 3)),
    F.conv_transpose1d: (torch.randn(2, 4, 9), torch.randn(4, 6, 3)),
    F.conv_transpose2d: (torch.randn(2, 4, 7, 7), torch.randn(4, 6, 3, 3)),
    F.conv_transpose3d: (torch.randn(1, 2, 5, 5, 5), torch.randn(2, 3, 3, 3, 3)),
    F.linear: (torch.randn(5, 8), torch.randn(3, 8)),
    torch.mm: (torch.randn(5, 8), torch.randn(8, 3)),
    torch.Tensor.mm: (torch.randn(5, 8), torch.randn(8, 3)),
    torch.matmul: (torch.randn(5, 8), torch.randn(8, 3)),
    torch.Tensor.matmul: (torch.randn(5, 8), torch.randn(8, 3)),
    torch.Tensor.__matmul__: (torch.randn(5, 8), torch.randn(8, 3)),
    torch.bmm: (torch.randn(2, 5, 8), torch.randn(2, 8, 3)),
    torch.Tensor.bmm: (torch.randn(2, 5, 8), torch.randn(2, 8, 3)),
}


def test_each_emulated_op_is_checked_below():
    assert set(_CALLS) == EMULATED


@pytest.mark.parametrize("func", list(_CALLS), ids=lambda f: getattr(f, "__qualname__", ""))
def test_every_emulated_op_is_one_autocast_lowers(func):
    """Emulating an op that autocast keeps in float32 would round what it does not: each op
    in EMULATED comes out bf16 under PyTorch's own autocast too, and close to ours (equal
    but for rounding: PyTorch's transposed convolutions round partial sums here)."""
    args = _CALLS[func]
    with torch.autocast("cpu", dtype=BF16):
        want = func(*args)
    with bf16_autocast("cpu", via_float32=True):
        got = func(*args)
    assert want.dtype == got.dtype == BF16
    assert ((got.float() - want.float()).norm() / want.float().norm()).item() < 1e-2


def test_reusable_like_torch_autocast():
    layer, x = _layers()["linear"]
    ctx = bf16_autocast("cpu", via_float32=True)
    for _ in range(3):
        with ctx:
            assert layer(x).dtype == BF16
        assert layer(x).dtype == torch.float32
    with pytest.raises(RuntimeError, match="boom"), ctx:
        raise RuntimeError("boom")
    assert layer(x).dtype == torch.float32  # left cleanly after an error


def test_resolved_path_takes_float32_kernels_where_bf16_is_not_native(monkeypatch):
    monkeypatch.setattr("splitcem.runtime._cpu_native_bf16", lambda: False)
    path = resolve_numeric_path(True, False, "cpu")
    assert path.amp and path.bf16_via_float32 and path.to_dict()["bf16_via_float32"]
    assert bf16_kernels("cpu") == "float32 kernels"
    layer, x = _layers()["conv2d"]
    with path.autocast():
        assert layer(x).dtype == BF16
    monkeypatch.setattr("splitcem.runtime._cpu_native_bf16", lambda: True)
    native = resolve_numeric_path(True, False, "cpu")
    assert not native.bf16_via_float32 and bf16_kernels("cpu") == "native"
    assert not resolve_numeric_path(False, False, "cpu").bf16_via_float32


@pytest.mark.skipif(not native_bf16("cpu"), reason="needs a CPU with AVX512-BF16 or AMX")
@pytest.mark.parametrize("name", ["conv2d", "conv_transpose2d", "linear"])
def test_native_bf16_kernels_match_the_same_oracle(name):
    """Where the CPU has bf16 units, PyTorch's kernels (oneDNN's, float32 sums) are what the
    runs made there used: they meet the oracle that ours meet."""
    layer, x = _layers()[name]
    y, up, gx, gw = _run(layer, x, torch.autocast("cpu", dtype=BF16))
    for got, exact in zip((y, gx, gw), exact_bf16(layer, x, up), strict=True):
        assert _same(got, exact) > 0.99
