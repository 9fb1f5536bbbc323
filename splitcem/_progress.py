"""Progress output: bars on a terminal, one log line per epoch everywhere else.

Why: redrawn bars piped into a file or a CI log are thousands of carriage-return lines
(a demo wrote 78 KB of them); a log line per epoch says the same in a few lines.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Iterable
from typing import Any

from tqdm.auto import tqdm

__all__ = ["bar", "bars_on", "epoch_log"]


def bars_on(progress: bool) -> bool:
    """Bars when asked for and stderr is a terminal (or a Jupyter kernel draws them)."""
    if not progress:
        return False
    try:
        tty = bool(sys.stderr.isatty())
    except (AttributeError, ValueError):  # replaced or closed stderr
        tty = False
    return tty or "ipykernel" in sys.modules


def bar(iterable: Iterable[Any] | None = None, *, progress: bool, **kw: Any) -> tqdm:
    """A tqdm bar that is drawn only when :func:`bars_on` (else a silent pass-through)."""
    return tqdm(iterable, disable=not bars_on(progress), dynamic_ncols=True, **kw)


def epoch_log(logger: logging.Logger, progress: bool, msg: str, *args: Any) -> None:
    """One INFO line per epoch when progress is wanted but no bar is drawn."""
    if progress and not bars_on(progress):
        logger.info(msg, *args)
