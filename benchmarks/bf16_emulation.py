"""bf16 autocast on a CPU without bf16 units: PyTorch's kernels against float32 kernels on
bf16-rounded operands (:mod:`splitcem._bf16`), in speed and in what they compute.

Times training steps of the CIFAR-10 CPU protocol's model (``splitcem/configs/cpu/
cifar10.yaml``, or ``--bottleneck 16`` for the zoo's bottleneck trials) on real CIFAR-10
images, batch 128, on three paths: float32, bf16 with PyTorch's kernels and bf16 via float32
kernels, all in the layout ``channels_last: auto`` picks. Rounds alternate the paths; the
median step of each is reported. Then measures how each bf16 path's output and gradients of
the model's first convolution agree with the oracle (exact arithmetic on bf16-rounded
operands, rounded to bf16 once): the share of elements equal.

    PYTHONPATH=. python benchmarks/bf16_emulation.py [--steps 4] [--rounds 2]
        [--threads 1] [--bottleneck 16]

On a CPU with bf16 units PyTorch's kernels are the native ones (the speed comparison is
then native against float32 kernels). Last line: one JSON object (seconds per step per path,
``speedup_via_float32_over_torch``, agreement shares, CPU capability).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

import splitcem
from splitcem._bf16 import exact_bf16
from splitcem.config import load_config
from splitcem.data import BatchLoader, make_splits
from splitcem.experiment import build_model
from splitcem.runtime import (
    NumericPath,
    cpu_capability,
    native_bf16,
    resolve_numeric_path,
    set_threads,
)

BF16 = torch.bfloat16


def _path(amp: bool, via: bool, channels_last: bool) -> NumericPath:
    return NumericPath(device="cpu", amp=amp, channels_last=channels_last,
                       native_bf16=native_bf16("cpu"), cpu_capability=cpu_capability(),
                       reason="benchmark", bf16_via_float32=via)


def _agreement(conv: nn.Conv2d, x: torch.Tensor, path: NumericPath) -> dict[str, float]:
    """Shares of the output, input gradient and weight gradient equal to the oracle's."""
    conv = copy.deepcopy(conv)
    xx = x.clone().requires_grad_()
    with path.autocast():
        y = conv(xx)
    y.retain_grad()
    (y.float() ** 2).mean().backward()
    assert y.grad is not None and xx.grad is not None and conv.weight.grad is not None
    want = exact_bf16(conv, x, y.grad)
    got = (y.detach(), xx.grad, conv.weight.grad)
    return {k: round((a == b).float().mean().item(), 5)
            for k, a, b in zip(("output", "grad_input", "grad_weight"), got, want, strict=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=4, help="timed steps per path and round")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--bottleneck", type=int, default=None,
                    help="bottleneck channels (the zoo's bottleneck trials: 16, stride 2)")
    args = ap.parse_args()
    threads = set_threads(args.threads)
    raw = load_config(Path(splitcem.__file__).parent / "configs/cpu/cifar10.yaml").to_dict()
    if args.bottleneck:
        raw["model"].update(bottleneck_channels=args.bottleneck, bottleneck_stride=2)
    raw["data"].update(limit_train=512, limit_test=128)
    cfg = load_config(raw)
    cl = resolve_numeric_path("auto", "auto", "cpu", quiet=True).channels_last
    splits = make_splits("cifar10", seed=0, limit_train=512, limit_test=128)
    x, y = next(iter(BatchLoader(splits.train, batch_size=128, shuffle=True, augment=False,
                                 device=torch.device("cpu"), seed=0, drop_last=True)))
    fmt = torch.channels_last if cl else torch.contiguous_format
    x = x.contiguous(memory_format=fmt)
    print(f"CPU capability {cpu_capability()}, native bf16: {native_bf16('cpu')}, {threads} "
          f"thread(s), {'channels-last' if cl else 'default layout'}, model "
          f"{cfg.model.arch} cut {cfg.model.cut} C{cfg.model.bottleneck_channels}"
          f"S{cfg.model.bottleneck_stride}", flush=True)

    paths = {"float32": _path(False, False, cl), "bf16_torch_kernels": _path(True, False, cl),
             "bf16_via_float32": _path(True, True, cl)}
    torch.manual_seed(0)
    model = build_model(cfg, splits).to(memory_format=fmt)  # type: ignore[call-overload]
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)

    def step(path: NumericPath) -> float:
        t0 = time.perf_counter()
        with path.autocast():
            logits = model(x)
        loss = F.cross_entropy(logits.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return time.perf_counter() - t0

    times: dict[str, list[float]] = {k: [] for k in paths}
    for path in paths.values():  # warm-up: one step each
        step(path)
    for r in range(args.rounds):
        order = list(paths)[r % 3:] + list(paths)[:r % 3]
        for name in order:
            times[name] += [step(paths[name]) for _ in range(args.steps)]
            print(f"round {r + 1}: {name} {statistics.median(times[name]):.3f} s/step",
                  flush=True)
    sec = {k: round(statistics.median(v), 4) for k, v in times.items()}

    conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    xs = x[:16].contiguous().float()
    agree = {name: _agreement(conv, xs, paths[name])
             for name in ("bf16_torch_kernels", "bf16_via_float32")}
    for name, a in agree.items():
        print(f"{name}: elements equal to the oracle {a}", flush=True)
    out: dict[str, Any] = {
        **{f"{k}_s_per_step": v for k, v in sec.items()},
        "speedup_via_float32_over_torch": round(sec["bf16_torch_kernels"]
                                                / sec["bf16_via_float32"], 2),
        "via_float32_over_float32_time": round(sec["bf16_via_float32"] / sec["float32"], 2),
        **{f"{n}_equal_{k}": v for n, a in agree.items() for k, v in a.items()},
        "cpu_capability": cpu_capability(), "native_bf16": native_bf16("cpu"),
        "threads": threads, "batch": 128, "bottleneck_channels": cfg.model.bottleneck_channels,
    }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
