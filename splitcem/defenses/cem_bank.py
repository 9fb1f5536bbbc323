"""The feature bank and the finiteness watch of the CEM defense (:mod:`splitcem.defenses.cem`).

CEM refits its per-class mixture at every epoch end from the clean features of the epoch.
Two pieces of bookkeeping serve that refit and are kept here, apart from the regulariser:

* :class:`FeatureBank`: the epoch's clean features and labels in preallocated device
  buffers (``bank="epoch"``), or :func:`collect_pass`, the reference's extra eval-mode pass
  over the training set (``bank="pass"``);
* :class:`FiniteWatch`: a NaN / inf check of the features without a host sync per step on
  accelerators (the first bad step is recorded on the device and raised at the epoch end).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn

from splitcem.errors import ConfigError, NonFiniteError

__all__ = ["FeatureBank", "FiniteWatch", "collect_pass", "nonfinite_message"]


def nonfinite_message(epoch: int, step: int | str) -> str:
    """The one-line error for non-finite client features at ``epoch`` / ``step``."""
    return (
        f"CEM: non-finite client features (or L_C) at epoch {epoch}, step {step}. The "
        "encoder diverged: lower the learning rate or lambda, or check the input data."
    )


class FeatureBank:
    """Rows of (features, label) for one epoch, in buffers that grow (rarely) as needed.

    Args:
        capacity: Rows to preallocate (the training set size when known).
    """

    def __init__(self, capacity: int) -> None:
        self.capacity = max(1, int(capacity))
        self._z: Tensor | None = None  # (capacity, D)
        self._y: Tensor | None = None  # (capacity,)
        self.n = 0  # host-side fill level: no syncs

    def add(self, z: Tensor, y: Tensor) -> None:
        """Copy a batch ``z`` (B, D) with labels ``y`` (B,) into the bank."""
        b = z.shape[0]
        if self._z is None or self._z.device != z.device:
            self._z = torch.empty(self.capacity, z.shape[1], device=z.device)
            self._y = torch.empty(self.capacity, dtype=torch.long, device=z.device)
            self.n = 0
        assert self._y is not None
        if self.n + b > self._z.shape[0]:
            cap = max(2 * self._z.shape[0], self.n + b)
            nz = torch.empty(cap, z.shape[1], device=z.device)
            ny = torch.empty(cap, dtype=torch.long, device=z.device)
            nz[: self.n] = self._z[: self.n]
            ny[: self.n] = self._y[: self.n]
            self._z, self._y = nz, ny
        self._z[self.n : self.n + b] = z  # casts AMP half to float32
        self._y[self.n : self.n + b] = y
        self.n += b

    def rows(self) -> tuple[Tensor, Tensor] | None:
        """(features (n, D), labels (n,)) banked so far, or None when empty (views)."""
        if self._z is None or self._y is None or self.n == 0:
            return None
        return self._z[: self.n], self._y[: self.n]

    def clear(self) -> None:
        """Empty the bank (its memory is kept for the next epoch)."""
        self.n = 0


class FiniteWatch:
    """NaN / inf check of a tensor without a host sync per step on accelerators.

    On the CPU reading the flag is free (no asynchronous queue), so the error is raised at
    the offending step. On an accelerator the first bad step is recorded in a device scalar
    (``masked_fill_`` with a host int: no transfer, no sync) and raised by :meth:`raise_if_bad`
    at the epoch end; the trainer's own loss check usually fires first.
    """

    def __init__(self) -> None:
        self._first_bad_step: Tensor | None = None  # device scalar, -1 while all finite

    def reset(self, device: torch.device) -> None:
        """Forget earlier steps; record on ``device``."""
        self._first_bad_step = torch.full((), -1, dtype=torch.long, device=device)

    def check(self, t: Tensor, epoch: int, step: int) -> None:
        """Raise (CPU) or record (accelerator) a non-finite value in ``t``."""
        bad = ~torch.isfinite(t).all()  # () bool, on t's device
        if t.device.type == "cpu":
            if bool(bad):
                raise NonFiniteError(nonfinite_message(epoch, step))
            return
        if self._first_bad_step is None or self._first_bad_step.device != t.device:
            self.reset(t.device)
        assert self._first_bad_step is not None
        self._first_bad_step.masked_fill_(bad & (self._first_bad_step < 0), step)

    def state(self) -> Tensor | None:
        """The first bad step recorded so far (a copy; -1: none), for a mid-epoch checkpoint."""
        return None if self._first_bad_step is None else self._first_bad_step.clone()

    def load(self, state: Tensor | None) -> None:
        """Restore :meth:`state`."""
        self._first_bad_step = state

    def raise_if_bad(self, epoch: int) -> None:
        """Raise for the first bad step recorded on an accelerator (one host sync)."""
        if self._first_bad_step is not None and int(self._first_bad_step) >= 0:
            raise NonFiniteError(nonfinite_message(epoch, int(self._first_bad_step)))


@torch.no_grad()
def collect_pass(
    client: nn.Module, batches: Callable[[], Iterator[tuple[Tensor, Tensor]]], epoch: int
) -> tuple[Tensor, Tensor, int]:
    """The reference's extra pass: (clean features (N, D), labels (N,), input dim) of the
    training set with ``client`` in eval mode (its mode restored)."""
    was_training = client.training
    client.eval()
    zs, ys = [], []
    input_dim = 0
    try:
        for x, y in batches():
            zs.append(client(x).flatten(1).float())  # (B, D)
            ys.append(y)
            input_dim = input_dim or int(x[0].numel())
    finally:
        client.train(was_training)
    if not zs:
        raise ConfigError("CEM bank='pass': train_batches() yielded no batches")
    z, y = torch.cat(zs), torch.cat(ys).to(torch.long)
    if not bool(torch.isfinite(z).all()):  # host sync, once per epoch
        raise NonFiniteError(nonfinite_message(epoch, "end-of-epoch feature pass"))
    return z, y, input_dim
