"""Export a trained run (or any split model) as a deployment: server half, client half, spec.

``splitcem serve`` runs the export of a run in a short-lived subprocess
(``python -m splitcem.serving.export RUN_DIR``) when ``RUN_DIR/deploy`` is missing or older
than the run's checkpoint, so the serving process itself never loads the checkpoint (which
holds the client encoder): it reads ``deploy/spec.json`` and ``deploy/server.safetensors``
only.

What the client applies before sending is the run's *deployed defense transform*: the
defenses of the stack that override ``Defense.transform`` (noise, dropout, top-k, local DP),
in order, in eval mode. Defenses that only add a training loss (CEM, NoPeek, adversarial)
or act on the encoder's weights (PATROL bakes its masks into them) need nothing at
deployment time.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from splitcem._io import atomic_write, load_checkpoint, write_text
from splitcem.data.info import DatasetInfo
from splitcem.defenses.base import Defense
from splitcem.errors import CheckpointError, ServingError
from splitcem.models import SplitModel
from splitcem.serving.deploy import (
    CLIENT_FILE,
    DEPLOY_DIR,
    FORMAT,
    SERVER_FILE,
    SPEC_FILE,
    find_deploy_dir,
    read_spec,
    sha256_bytes,
)

__all__ = ["ensure_export", "export_model", "export_run", "is_stale", "transforms_features"]

CHECKPOINT = Path("checkpoints") / "last.pt"


def transforms_features(defense: Defense) -> bool:
    """Whether ``defense`` changes the features the client sends (overrides ``transform``)."""
    return type(defense).transform is not Defense.transform


def _tensors(prefix: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {prefix + k: v.detach().cpu().contiguous().clone()
            for k, v in module.state_dict().items()}


def export_model(
    model: SplitModel,
    out_dir: str | Path,
    *,
    info: DatasetInfo,
    name: str,
    transforms: Sequence[tuple[dict[str, Any], Defense]] = (),
    source: dict[str, Any] | None = None,
) -> Path:
    """Write ``model`` as a deployment (server file, client file, spec.json) into ``out_dir``.

    Args:
        model: A trained :class:`~splitcem.models.SplitModel` made by
            :func:`~splitcem.models.create_split_model` (its ``config`` rebuilds it).
        out_dir: The deployment directory (created).
        info: The dataset's description: input normalisation and class names.
        name: A human-readable model name (the run's name).
        transforms: (spec, defense) pairs the client applies to its features before
            sending, in order (spec = ``{"name": registered defense, **params}``).
        source: Where the weights came from (recorded in the spec).

    Returns:
        ``out_dir``. The export is checked by loading both halves back and comparing their
        composition with ``model`` on a random input.
    """
    if not model.config:
        raise ServingError("the model has no config to rebuild it from; build it with "
                           "splitcem.models.create_split_model; for any other model use "
                           "splitcem.export(client, server, out, example=...)")
    return write_deployment(out_dir, client=model.client, server=model.server,
                            feature_shape=model.feature_shape, model_spec=dict(model.config),
                            info=info, name=name, transforms=transforms, source=source)


def write_deployment(
    out_dir: str | Path,
    *,
    client: torch.nn.Module,
    server: torch.nn.Module,
    feature_shape: Sequence[int],
    model_spec: dict[str, Any],
    info: DatasetInfo,
    name: str,
    transforms: Sequence[tuple[dict[str, Any], Defense]] = (),
    source: dict[str, Any] | None = None,
    programs: dict[str, bytes] | None = None,
) -> Path:
    """Write the two halves, their programs (if any: ``{"server": bytes, "client": bytes}``,
    see :mod:`splitcem.serving.program`) and ``spec.json`` into ``out_dir``, then load both
    halves back and check that they compose to ``server(client(x))``."""
    from safetensors.torch import save

    from splitcem.serving.program import PROGRAM_FILES

    out = Path(out_dir)
    client_t = _tensors("client.", client)
    for i, (_, d) in enumerate(transforms):
        client_t.update(_tensors(f"defense.{i}.", d))
    server_bytes = save(_tensors("server.", server), metadata={"half": "server"})
    client_bytes = save(client_t, metadata={"half": "client"})
    sigma = sum(float(d.noise_sigma) ** 2 for _, d in transforms) ** 0.5
    files = {"server": {"path": SERVER_FILE, "sha256": sha256_bytes(server_bytes)},
             "client": {"path": CLIENT_FILE, "sha256": sha256_bytes(client_bytes)}}
    blobs = [(SERVER_FILE, server_bytes), (CLIENT_FILE, client_bytes)]
    for half, data in (programs or {}).items():
        files[f"{half}_program"] = {"path": PROGRAM_FILES[half], "sha256": sha256_bytes(data)}
        blobs.append((PROGRAM_FILES[half], data))
    spec = {
        "format": FORMAT,
        "model_id": f"{name}@{sha256_bytes(server_bytes + client_bytes)[:12]}",
        "name": name,
        "dataset": info.name,
        "classes": list(info.classes),
        "image": {"channels": info.channels, "size": info.image_size,
                  "mean": list(info.mean), "std": list(info.std)},
        "features": {"shape": [int(v) for v in feature_shape], "dtype": "float32"},
        "model": dict(model_spec),
        "defense": {
            "transforms": [s for s, _ in transforms],
            "noise_sigma": sigma,
            "mode": "eval",
            "describe": " + ".join(f"{d.name}({d.extra_repr()})" for _, d in transforms)
            or "none",
        },
        "files": files,
        "source": dict(source or {}),
    }
    for fname, data in blobs:
        _write_bytes(out / fname, data)
    write_text(out / SPEC_FILE, json.dumps(spec, indent=2) + "\n")  # last: names the files
    _verify(client, server, out, info)
    return out


@torch.no_grad()
def _verify(client: torch.nn.Module, server: torch.nn.Module, out: Path,
            info: DatasetInfo) -> None:
    """Load both halves from ``out`` and check they compose to ``server(client(x))`` (no
    transforms) on a seeded random input, in eval mode (modes restored)."""
    from splitcem.serving.halves import ClientHalf, ServerHalf

    c_half, s_half = ClientHalf(out), ServerHalf(out)
    saved = [(m, m.training) for m in [*client.modules(), *server.modules()]]
    client.eval()
    server.eval()
    try:
        x = torch.randn(2, info.channels, info.image_size, info.image_size,
                        generator=torch.Generator().manual_seed(0))
        p = next(iter(client.parameters()), None)
        dev = p.device if p is not None else torch.device("cpu")
        want = server(client(x.to(dev)).float()).float().cpu()
        got = s_half.logits(c_half.encoder(x))
    finally:
        for m, was in saved:
            m.training = was
    if not torch.allclose(got, want, rtol=1e-4, atol=1e-4):
        raise ServingError(f"the export in {out} does not reproduce the model (max logit "
                           f"difference {float((got - want).abs().max()):.3g}); please report")


def _write_bytes(path: Path, data: bytes) -> None:
    def write(p: Path) -> None:
        p.write_bytes(data)

    atomic_write(path, write)


def _fingerprint(path: Path) -> dict[str, Any]:
    st = path.stat()
    return {"checkpoint": str(CHECKPOINT), "size": st.st_size, "mtime_ns": st.st_mtime_ns}


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Export a trained run directory into ``out_dir`` (default ``RUN_DIR/deploy``).

    Loads the run's config and last checkpoint on the CPU, rebuilds the split model and the
    deployed defense transforms, and writes the deployment (:func:`export_model`).
    """
    from splitcem.data import load_dataset
    from splitcem.defenses import create_defense
    from splitcem.models import create_split_model
    from splitcem.record import RunRecord

    run = Path(run_dir)
    record = RunRecord.load(run)
    if record.config is None:
        raise CheckpointError(f"{run} is not a run directory ({record.config_error}); train "
                              "one with splitcem train CONFIG --out DIR")
    cfg = record.config
    info = load_dataset(cfg.data.name, "test", root=cfg.data.root,
                        cache_dir=cfg.data.cache_dir).info
    ckpt = run / CHECKPOINT
    state = load_checkpoint(ckpt, "cpu")
    model = create_split_model(
        cfg.model.arch, num_classes=info.num_classes, in_channels=info.channels,
        image_size=info.image_size, **cfg.model.model_dump(exclude={"arch"}),
    )
    try:
        model.load_state_dict(state["model"])
    except RuntimeError as e:
        raise CheckpointError(f"{run}: checkpoint does not match its config: {e}") from e
    stack_state = state.get("defenses", {})
    pairs: list[tuple[dict[str, Any], Defense]] = []
    for i, s in enumerate(cfg.defenses):  # the stack's order; CEM (appended last) has none
        d = create_defense(s["name"], **{k: v for k, v in s.items() if k != "name"})
        if not transforms_features(d):
            continue
        pairs.append((dict(s), d))
        prefix = f"defenses.{i}."
        sub = {k[len(prefix):]: v for k, v in stack_state.items() if k.startswith(prefix)}
        try:
            d.load_state_dict(sub)
        except RuntimeError as e:
            raise ServingError(f"defense {s['name']!r} keeps state that cannot be restored "
                               f"outside training ({e}); it cannot be deployed yet") from e
    model.eval()
    source = {**_fingerprint(ckpt), "epoch": int(state.get("epoch", 0)),
              "checkpoint_sha256": sha256_bytes(ckpt.read_bytes())}
    out = Path(out_dir) if out_dir is not None else run / DEPLOY_DIR
    return export_model(model, out, info=info, name=cfg.name, transforms=pairs, source=source)


def is_stale(run_dir: str | Path) -> bool:
    """Whether ``RUN_DIR/deploy`` is missing or older than the run's checkpoint."""
    run = Path(run_dir)
    ckpt = run / CHECKPOINT
    try:
        spec = read_spec(run / DEPLOY_DIR)
    except ServingError:
        return True
    if not ckpt.is_file():
        return False  # a deployment without its run (copied elsewhere): use it as it is
    src = spec.get("source", {})
    fp = _fingerprint(ckpt)
    return (src.get("size"), src.get("mtime_ns")) != (fp["size"], fp["mtime_ns"])


def ensure_export(path: str | Path, *, timeout: float = 600.0) -> Path:
    """The deployment directory for ``path``; exports a run first when needed.

    ``path`` is a deployment directory (used as it is) or a run directory, whose
    ``deploy/`` is (re)written by a short-lived subprocess if missing or stale, so the
    calling process never loads the checkpoint.
    """
    path = Path(path)
    d = find_deploy_dir(path)
    is_run = (path / "config.yaml").is_file()
    if d != path and is_run and is_stale(path):
        env = dict(os.environ)
        proc = subprocess.run(
            [sys.executable, "-m", "splitcem.serving.export", str(path)],
            capture_output=True, text=True, timeout=timeout, env=env, check=False,
        )
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["(no output)"]
            raise ServingError(f"exporting {path} failed: {tail[0]}")
    read_spec(d)  # raises with what to do if there is still none
    return d


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m splitcem.serving.export RUN_DIR [OUT_DIR]``: export, print the directory."""
    from splitcem.errors import SplitcemError

    args = list(sys.argv[1:] if argv is None else argv)
    if not 1 <= len(args) <= 2:
        print("usage: python -m splitcem.serving.export RUN_DIR [OUT_DIR]", file=sys.stderr)
        return 2
    try:
        out = export_run(args[0], args[1] if len(args) > 1 else None)
    except SplitcemError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
