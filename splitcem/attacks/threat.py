"""Threat models: which data the attacker learns from, which it is scored on, what it may touch.

Two independent choices (docs/attacks.md has the full definitions):

* **setting** (which images): ``"inference"``: the attacker trains on 90% of the test set
  (``splits.aux``) and is scored on the other 10% (``splits.eval``), the paper's default;
  ``"training"``: it trains on the client's training set and is scored on the test set.
* **access** (what it may do with the client), ordered from least to most:
  ``"outputs"``: only the features the server receives for the victim's images, plus its
  own auxiliary images (no way to encode them); ``"query"``: also submit its auxiliary
  images to the deployed client as often as it likes and receive the features exactly as
  they are sent (defense transform included, fresh randomness per query), i.e. black-box
  query access; ``"whitebox"``: also the encoder's weights and architecture, and the
  defense's configuration (type, sigma, masks), so it can compute clean features,
  differentiate through the encoder and simulate the defense itself.

An attack declares the least access it ``requires``; the suite skips, with a reason, attacks
that need more than the threat model grants.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any, Literal

from splitcem.errors import ConfigError

if TYPE_CHECKING:
    from splitcem.data.dataset import ArrayDataset

__all__ = [
    "ACCESS_LEVELS",
    "SETTINGS",
    "Access",
    "Setting",
    "ThreatModel",
    "check_access",
    "parse_threats",
]

Access = Literal["outputs", "query", "whitebox"]
Setting = Literal["inference", "training"]
#: access levels from least to most powerful
ACCESS_LEVELS: tuple[str, ...] = ("outputs", "query", "whitebox")
SETTINGS: tuple[str, ...] = ("inference", "training")


def check_access(granted: str, required: str) -> str | None:
    """``None`` if ``granted`` access covers ``required``, else the reason it does not."""
    if ACCESS_LEVELS.index(granted) >= ACCESS_LEVELS.index(required):
        return None
    return f"needs {required!r} access; the threat model grants only {granted!r}"


@dataclass(frozen=True)
class ThreatModel:
    """Which images the attacker learns from / is scored on, and its access to the client.

    Args:
        setting: ``"inference"`` (aux = 90% of test, held out = the other 10%) or
            ``"training"`` (aux = training set, held out = test set).
        access: ``"outputs"``, ``"query"`` or ``"whitebox"`` (see the module docstring).
            The default grants everything: a defense is judged by its worst case.
        heldout_limit: Score on the first N held-out images only (same images for every
            attack), to bound the cost of per-image attacks such as rMLE; ``None``: all.
        aux_limit: Learn from the first N auxiliary images only; ``None``: all.

    Example:
        >>> ThreatModel(setting="training", access="query").access
        'query'
    """

    setting: Setting = "inference"
    access: Access = "whitebox"
    heldout_limit: int | None = None
    aux_limit: int | None = None

    def __post_init__(self) -> None:
        if self.setting not in SETTINGS:
            raise ConfigError(f"threat setting must be one of {SETTINGS}, got {self.setting!r}")
        if self.access not in ACCESS_LEVELS:
            raise ConfigError(
                f"threat access must be one of {ACCESS_LEVELS}, got {self.access!r}")
        for k in ("heldout_limit", "aux_limit"):
            v = getattr(self, k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
                raise ConfigError(f"threat {k} must be a positive integer or null, got {v!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> ThreatModel:
        """Build from a config mapping; unknown keys are errors."""
        d = dict(d or {})
        known = {"setting", "access", "heldout_limit", "aux_limit"}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ConfigError(f"threat model has no key(s) {unknown}; known: {sorted(known)}")
        return cls(**d)

    @classmethod
    def parse(cls, spec: str | Mapping[str, Any] | ThreatModel) -> ThreatModel:
        """From a setting name (``"training"``), a mapping, or a ThreatModel itself."""
        if isinstance(spec, ThreatModel):
            return spec
        if isinstance(spec, str):
            return cls(setting=spec)  # type: ignore[arg-type]
        if isinstance(spec, Mapping):
            return cls.from_dict(dict(spec))
        raise ConfigError(f"a threat model is a setting name or a mapping, got {spec!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def short(self) -> str:
        """``"setting/access"``, e.g. ``"training/whitebox"`` (labels, tables)."""
        return f"{self.setting}/{self.access}"

    def select(self, splits: Any) -> tuple[ArrayDataset, ArrayDataset]:
        """(aux, heldout) datasets from a ``DataSplits`` (train, aux, eval, test)."""
        if self.setting == "inference":
            aux, heldout = splits.aux, splits.eval
        else:
            aux, heldout = splits.train, splits.test
        if self.aux_limit is not None and len(aux) > self.aux_limit:
            aux = aux.subset(list(range(self.aux_limit)))
        if self.heldout_limit is not None and len(heldout) > self.heldout_limit:
            heldout = heldout.subset(list(range(self.heldout_limit)))
        return aux, heldout

    def allows(self, required: str) -> str | None:
        """``None`` if an attack requiring ``required`` access may run, else why not."""
        return check_access(self.access, required)


def parse_threats(spec: Any) -> list[ThreatModel]:
    """One or several threat models from config: a setting name, a mapping, a ThreatModel,
    or a list of these (the suite then reports the worst case across all of them).

    Example:
        >>> [t.short for t in parse_threats(["inference", {"setting": "training"}])]
        ['inference/whitebox', 'training/whitebox']
    """
    if spec is None:
        return [ThreatModel()]
    if isinstance(spec, str | Mapping | ThreatModel):
        return [ThreatModel.parse(spec)]
    if isinstance(spec, Sequence) and spec:
        return [ThreatModel.parse(s) for s in spec]
    raise ConfigError(f"threat must be a setting name, a mapping or a non-empty list of them, "
                      f"got {spec!r}")
