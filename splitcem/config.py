"""Run configuration: YAML in, typed and validated objects out.

Experiment files only override defaults (nanoGPT's configurator rule, with a real parser):
an unknown key or a value of the wrong type is a :class:`~splitcem.errors.ConfigError` that
names the key. Defense and attack parameters are checked against the registered factory's
signature when the objects are built (:func:`splitcem.experiment.build_defenses`).
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from splitcem.errors import ConfigError

__all__ = [
    "AttackConfig",
    "AugmentConfig",
    "CEMConfig",
    "DataConfig",
    "ModelConfig",
    "RunConfig",
    "TrainConfig",
    "apply_overrides",
    "bundled_configs",
    "config_summary",
    "load_config",
    "resolve_config",
    "set_path",
]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class AugmentConfig(_Strict):
    """Training augmentation (splitcem.data.Augment); the paper uses all three."""

    crop_pad: int = Field(4, ge=0)
    flip: bool = True
    rotation: float = Field(15.0, ge=0)


class DataConfig(_Strict):
    """Which images, how many, and how they are split (train, attacker's aux, held-out eval)."""

    name: str = "cifar10"
    root: str | None = None  # None: search the default places (see splitcem.data)
    limit_train: int | None = Field(None, gt=0)
    limit_test: int | None = Field(None, gt=0)
    aux_fraction: float = Field(0.9, gt=0, lt=1)
    #: seed of the attacker's aux / held-out eval partition of the test set, separate from
    #: the run's seed so that every seed of a study is attacked on the same held-out images
    #: (125: the seed of the first committed runs, which keep their partition); ``null``: the
    #: run's own seed (how splits were drawn before 0.2). Training does not depend on it.
    split_seed: int | None = 125
    #: true: the paper's crop + flip + rotation 15; false: none; or an AugmentConfig mapping
    augment: bool | AugmentConfig = True
    cache_dir: str | None = None


class ModelConfig(_Strict):
    """Arguments of :func:`splitcem.models.create_split_model` (minus what the data fixes)."""

    arch: str = "vgg11_bn"
    #: backbone layers on the client; for a registered model that is not a splitcem
    #: Backbone (a plugin's nn.Module), the name of the client's last module
    cut: Annotated[int, Field(ge=1)] | str = 4
    bottleneck_channels: int | None = Field(8, ge=1)
    bottleneck_stride: int = Field(1, ge=1)
    bottleneck_relu: bool = False
    activation: str = "sigmoid"
    client_width: float = Field(1.0, gt=0)
    server_width: float = Field(1.0, gt=0)


class TrainConfig(_Strict):
    """SGD with momentum (or Adam), linear warm-up, then step (x``gamma`` per milestone) or
    cosine decay."""

    epochs: int = Field(240, ge=1)
    batch_size: int = Field(128, ge=1)
    #: "sgd" (with momentum, the paper's) or "adam" (betas 0.9 / 0.999; momentum unused)
    optimizer: Literal["sgd", "adam"] = "sgd"
    lr: float = Field(0.05, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    warmup_epochs: int = Field(0, ge=0)
    #: "step": x gamma at each milestone epoch; "cosine": cosine decay to 0 after warm-up
    schedule: Literal["step", "cosine"] = "step"
    milestones: list[int] = Field(default_factory=lambda: [60, 120, 180, 210])
    gamma: float = Field(0.2, gt=0)
    #: bfloat16 autocast of the model's convolutions; features, noise and losses stay
    #: float32. ``auto``: on where bf16 is native (CUDA compute capability >= 8, CPUs with
    #: AVX512-BF16 or AMX), float32 elsewhere (see splitcem.runtime)
    amp: bool | Literal["auto"] = "auto"
    #: channels-last memory layout; ``auto``: on x86 CPUs (oneDNN) and with bf16 on CUDA
    channels_last: bool | Literal["auto"] = "auto"
    label_smoothing: float = Field(0.0, ge=0, lt=1)
    eval_every: int = Field(1, ge=1)
    #: also log each epoch's figures for TensorBoard in RUN_DIR/tensorboard (needs the
    #: tensorboard package: pip install 'splitcem[tensorboard]'); changes no result
    tensorboard: bool = False

    @field_validator("milestones")
    @classmethod
    def _sorted(cls, v: list[int]) -> list[int]:
        if sorted(v) != v or any(m < 1 for m in v):
            raise ValueError(f"milestones must be increasing positive epochs, got {v}")
        return v


class CEMConfig(_Strict):
    """The CEM regulariser (splitcem.cem); ``lambda: 0`` keeps only its entropy estimates."""

    lam: float = Field(0.0, ge=0, alias="lambda")
    clusters: int = Field(5, ge=1)
    form: Literal["paper", "reference"] = "paper"
    tau: float | None = Field(None, gt=0)
    bank: Literal["epoch", "pass"] = "epoch"
    warmup_epochs: int = Field(1, ge=0)
    lr_scaling: bool = False
    max_iter: int = Field(50, ge=1)
    h_x: float | None = None
    blend_scale: float = Field(10.0, gt=0)
    kmeans_tol: float = Field(1e-3, ge=0)
    n_init: int = Field(3, ge=1)
    seed: int = 0

    def kwargs(self) -> dict[str, Any]:
        """Keyword arguments for the registered ``cem`` defense."""
        return self.model_dump(by_alias=False)


class AttackConfig(_Strict):
    """Which attacks run after training, and under which threat model."""

    #: threat model (splitcem.attacks.ThreatModel): ``inference`` / ``training`` as a short
    #: form, or a mapping {setting, access, heldout_limit, aux_limit}; or a list of these,
    #: to run every attack under each and report the worst case across all of them
    threat: str | dict[str, Any] | list[str | dict[str, Any]] = "inference"
    attacks: list[dict[str, Any]] = Field(default_factory=lambda: [{"name": "decoder"}])
    show: int = Field(8, ge=1)  # images per grid
    #: after the attacks, estimate the I(x; z) bound on held-out features (splitcem.leakage)
    leakage: bool = True

    @field_validator("attacks")
    @classmethod
    def _named(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, spec in enumerate(v):
            if not isinstance(spec, dict) or "name" not in spec:
                raise ValueError(f"attack #{i} needs a 'name' key, got {spec!r}")
        return v


class RunConfig(_Strict):
    """One run: data, split model, defenses (+ CEM), training and attacks."""

    name: str = "run"
    seed: int = 125
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    data: DataConfig = Field(default_factory=DataConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    defenses: list[dict[str, Any]] = Field(default_factory=list)
    cem: CEMConfig | None = None
    attack: AttackConfig = Field(default_factory=AttackConfig)

    @field_validator("defenses")
    @classmethod
    def _named(cls, v: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for i, spec in enumerate(v):
            if not isinstance(spec, dict) or "name" not in spec:
                raise ValueError(f"defense #{i} needs a 'name' key, got {spec!r}")
        return v

    @model_validator(mode="after")
    def _warmup(self) -> RunConfig:
        if self.train.warmup_epochs >= self.train.epochs and self.train.warmup_epochs > 0:
            raise ValueError(
                f"train.warmup_epochs ({self.train.warmup_epochs}) must be < train.epochs "
                f"({self.train.epochs})"
            )
        return self

    def to_dict(self) -> dict[str, Any]:
        """The fully resolved config, as written to a run directory (``lambda`` by name)."""
        return self.model_dump(by_alias=True, mode="json")


def _format_errors(e: ValidationError, source: str) -> str:
    lines = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "(top level)"
        if err["type"] == "extra_forbidden":
            lines.append(f"  {where}: unknown key (check the spelling; see splitcem/config.py)")
        else:
            lines.append(f"  {where}: {err['msg']} (got {err.get('input')!r})")
    return f"invalid config {source}:\n" + "\n".join(lines)


def set_path(d: Any, dotted: str, value: Any) -> None:
    """Set ``a.b.0.c``-style paths; integer parts index lists (``defenses.0.sigma``)."""
    keys = dotted.split(".")
    for i, k in enumerate(keys):
        last = i == len(keys) - 1
        if isinstance(d, list):
            if not k.isdigit() or int(k) >= len(d):
                raise ConfigError(f"override {dotted!r}: {k!r} is not an index of a list "
                                  f"of {len(d)}")
            if last:
                d[int(k)] = value
            else:
                d = d[int(k)]
        elif isinstance(d, dict):
            if last:
                d[k] = value
            else:
                d = d.setdefault(k, {})
        else:
            raise ConfigError(f"override {dotted!r}: {k!r} is inside a value, not a section")


def _yaml_error(e: yaml.YAMLError, where: str) -> str:
    """One line: where the parser stopped and why (its own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    ctx, cmark = getattr(e, "context", None), getattr(e, "context_mark", None)
    if ctx and cmark is not None:
        problem += f" ({ctx} started at line {cmark.line + 1}, column {cmark.column + 1})"
    elif ctx:
        problem += f" ({ctx})"
    return f"{where} is not valid YAML{at}: {problem}; fix the syntax there"


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """Apply ``key.sub=value`` overrides (values parsed as YAML) to a copy of a raw config
    dict."""
    out = copy.deepcopy(raw)
    for ov in overrides:
        if "=" not in ov:
            raise ConfigError(f"override {ov!r} must look like key.sub=value")
        key, val = ov.split("=", 1)
        try:
            parsed = yaml.safe_load(val)
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(e, f"override {ov!r}")) from None
        set_path(out, key.strip(), parsed)
    return out


#: PyYAML's safe loader in C (libyaml) where its wheel has it, else in Python: the same
#: documents, several times faster (every run record read parses its config.yaml)
_SAFE_LOADER: Any = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

#: the run configs shipped inside the package (``splitcem configs`` lists them)
CONFIG_DIR = Path(__file__).resolve().parent / "configs"


#: bundled folders that hold sweep files (splitcem sweep / reproduce), not run configs
SWEEP_DIRS = ("sweeps",)


def bundled_configs() -> dict[str, Path]:
    """Bundled run config name -> file: names are paths under the package's ``configs/``
    without ``.yaml`` (``cpu/cifar10_noise_cem``), sorted; sweep files are not listed."""
    if not CONFIG_DIR.is_dir():
        return {}
    return {p.relative_to(CONFIG_DIR).with_suffix("").as_posix(): p
            for p in sorted(CONFIG_DIR.rglob("*.yaml"))
            if p.relative_to(CONFIG_DIR).parts[0] not in SWEEP_DIRS}


def config_summary(path: Path) -> str:
    """The first line of a config's leading comment (for listings)."""
    for line in path.read_text().splitlines():
        if line.startswith("#"):
            return line.lstrip("#").strip()
        if line.strip():
            break
    return ""


def resolve_config(source: str | Path) -> Path:
    """A config file: ``source`` itself if it is a file, else the bundled config it names,
    by its full name (``cpu/cifar10_noise_cem``) or, when unique, its last part
    (``cifar10_noise_cem``); ``.yaml`` is optional."""
    path = Path(source)
    if path.is_file():
        return path
    name = path.as_posix().removesuffix(".yaml").removeprefix("configs/")
    bundled = bundled_configs()
    if name in bundled:
        return bundled[name]
    hits = [k for k in bundled if k.rsplit("/", 1)[-1] == name]
    if len(hits) == 1:
        return bundled[hits[0]]
    if len(hits) > 1:
        raise ConfigError(f"config name {name!r} is ambiguous: {', '.join(hits)}; "
                          "give the full name")
    raise ConfigError(f"config {source} does not exist: it is neither a file nor a bundled "
                      "config's name; "
                      f"`splitcem configs` lists the bundled ones "
                      f"({', '.join(list(bundled)[:6])}{', ...' if len(bundled) > 6 else ''})")


def load_config(
    source: str | Path | dict[str, Any], overrides: list[str] | tuple[str, ...] = ()
) -> RunConfig:
    """Read a YAML file, a bundled config by name, or a dict into a validated
    :class:`RunConfig`.

    Example:
        >>> cfg = load_config({"train": {"epochs": 2}, "defenses": [{"name": "noise"}]})
        >>> cfg.train.epochs
        2
    """
    if isinstance(source, dict):
        raw, where = source, "(dict)"
    else:
        path = resolve_config(source)
        try:
            raw = yaml.load(path.read_text(), Loader=_SAFE_LOADER) or {}
        except yaml.YAMLError as e:
            raise ConfigError(_yaml_error(e, f"config file {path}")) from None
        except UnicodeDecodeError:
            raise ConfigError(f"config file {path} is not a text file; pass a YAML config "
                              "(see configs/)") from None
        where = str(path)
    if not isinstance(raw, dict):
        raise ConfigError(f"config {where} must be a mapping at the top level")
    raw = apply_overrides(raw, overrides)
    try:
        return RunConfig.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_errors(e, where)) from None
