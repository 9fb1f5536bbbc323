"""Typed errors. Every message says what went wrong and what to do about it."""

from __future__ import annotations

__all__ = [
    "CheckpointError",
    "ConfigError",
    "CutPointError",
    "DataError",
    "DatasetNotFoundError",
    "NonFiniteError",
    "PluginError",
    "ProtectError",
    "ServingError",
    "SpecMismatchError",
    "SplitcemError",
    "UnknownNameError",
]


class SplitcemError(Exception):
    """Base class of all errors raised on purpose by splitcem."""


class ConfigError(SplitcemError, ValueError):
    """A configuration value or key is invalid (the message names it)."""


class UnknownNameError(ConfigError, KeyError):
    """A registry lookup used a name that is not registered (the message lists the known ones)."""

    def __str__(self) -> str:  # KeyError would repr() the message; keep it readable
        return str(self.args[0]) if self.args else ""


class CutPointError(ConfigError):
    """A model cannot be cut where asked (the message lists the valid cut points)."""


class ProtectError(SplitcemError, RuntimeError):
    """A protected client was used out of order (the message says which call is missing)."""


class DataError(SplitcemError, ValueError):
    """A dataset exists but cannot be used as is (corrupt file, empty class folder, ...)."""


class DatasetNotFoundError(DataError, FileNotFoundError):
    """A dataset was not found where it was looked for (the message says where and how to
    get it)."""


class NonFiniteError(SplitcemError, FloatingPointError):
    """A loss or a tensor became NaN or infinite (the message names the step)."""


class PluginError(SplitcemError, ImportError):
    """A third-party plugin (an entry point) failed to load (the message names the package)."""


class CheckpointError(SplitcemError, RuntimeError):
    """A checkpoint is missing, corrupt or does not match the run it should resume."""


class ServingError(SplitcemError, RuntimeError):
    """A deployed split could not serve a request: a server answered with an error, or a
    deployment (``RUN_DIR/deploy``) is missing or corrupt (the message says what to do)."""

    def __init__(self, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        #: the HTTP status the server answered with, if any
        self.status = status


class SpecMismatchError(ServingError):
    """The server serves another model or noise contract than the client was exported with."""
