"""Shared fixtures. Tests run on the CPU, single-threaded, with fixed seeds.

Tests that need real data from ``../shared/datasets`` skip with a reason on a user's machine
without it, but fail under CI (``CI=true``), where the data must be found.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from splitcem.runtime import default_threads

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("SPLITCEM_SHARED", REPO.parent / "shared")) / "datasets"
CIFAR_TAR = SHARED_DATASETS / "cifar10-jpeg.tar.gz"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")

# at most 2 threads, and only the cores other processes leave free: a thread per core that
# another job keeps busy makes every parallel op wait for it (many-fold slower tests)
torch.set_num_threads(min(2, default_threads()))

# a package of its own (installed by .ci/package_check.sh); importing it while collecting
# (e.g. for doctests) would register its attack in the global registry for every test
collect_ignore = ["plugin_pkg"]


def need(path: Path, how: str) -> Path:
    """Return ``path`` if it exists; otherwise skip (user machine) or fail (CI)."""
    if path.exists():
        return path
    msg = f"{path} not found ({how})"
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        pytest.fail(f"CI must have the shared data: {msg}")
    pytest.skip(msg)


@pytest.fixture(scope="session")
def cache_dir() -> Path:
    """The test runs' own decoded-array cache (set by the repository's root conftest.py:
    ``.cache/test-data`` in the checkout, never the user's ``~/.cache/splitcem``).

    Kept across sessions (decoding CIFAR-10 takes seconds) and safe to share: entries are
    keyed on the source file's path, size and mtime and written atomically; tests of the
    cache itself use their own temporary folders.
    """
    return Path(os.environ["SPLITCEM_CACHE"])


@pytest.fixture(scope="session")
def cifar_tar() -> Path:
    return need(CIFAR_TAR, "the shared CIFAR-10 JPEG archive; see ../shared/datasets/README.md")


@pytest.fixture(scope="session")
def cifar_splits(cifar_tar, cache_dir):
    """A few hundred real CIFAR-10 images: 512 train, 256 test (230 aux / 26 eval)."""
    from splitcem.data import make_splits

    return make_splits(
        "cifar10", root=cifar_tar, seed=0, limit_train=512, limit_test=256, cache_dir=cache_dir
    )


@pytest.fixture(scope="session")
def fashion_dir() -> Path:
    return need(FASHION_DIR, "apt-get install dataset-fashion-mnist")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture
def tiny_config(cifar_tar, cache_dir):
    """Factory of small real run configs: 256 CIFAR-10 training images, quarter widths.

    ``tiny_config(**sections)`` merges each given section into the defaults, e.g.
    ``tiny_config(defenses=[{"name": "noise", "sigma": 0.1}], cem={"lambda": 0.1})``.
    """
    from splitcem.config import load_config

    def make(**sections):
        raw = {
            "name": "tiny",
            "seed": 0,
            "device": "cpu",
            "data": {"name": "cifar10", "root": str(cifar_tar), "limit_train": 256,
                     "limit_test": 128, "cache_dir": str(cache_dir)},
            "model": {"client_width": 0.25, "server_width": 0.25},
            "train": {"epochs": 2, "batch_size": 64, "lr": 0.05, "warmup_epochs": 1,
                      "milestones": [2]},
            "attack": {"attacks": [{"name": "decoder", "epochs": 2, "width": 16, "depth": 1}]},
        }
        for key, val in sections.items():
            if isinstance(val, dict) and isinstance(raw.get(key), dict):
                raw[key] = {**raw[key], **val}
            else:
                raw[key] = val
        return load_config(raw)

    return make


@pytest.fixture(scope="session")
def served_run(cifar_tar, cache_dir, tmp_path_factory):
    """A tiny trained and attacked run to deploy: 512 real CIFAR-10 images, quarter widths,
    1 epoch, noise sigma 0.1, a small decoder attack (which saves its decoder)."""
    from splitcem.config import load_config
    from splitcem.experiment import run_experiment

    run = tmp_path_factory.mktemp("served") / "run"
    cfg = load_config({
        "name": "tiny_served", "seed": 0, "device": "cpu",
        "data": {"name": "cifar10", "root": str(cifar_tar), "limit_train": 512,
                 "limit_test": 256, "cache_dir": str(cache_dir)},
        "model": {"client_width": 0.25, "server_width": 0.25},
        "defenses": [{"name": "noise", "sigma": 0.1}],
        "train": {"epochs": 1, "batch_size": 64, "lr": 0.05, "warmup_epochs": 0,
                  "milestones": [2]},
        "attack": {"attacks": [{"name": "decoder", "epochs": 2, "width": 16, "depth": 1}]},
    })
    run_experiment(cfg, run, progress=False)
    return run


@pytest.fixture(scope="session")
def serving(served_run, tmp_path_factory):
    """``splitcem serve RUN_DIR`` in its own process on loopback, with a bearer token and
    --max-batch 64, under an audit hook that logs every file it opens. Yields a namespace
    with ``proc``, ``url``, ``token``, ``token_file``, ``audit_log``, ``run``."""
    from types import SimpleNamespace

    from _serving_utils import start_server

    d = tmp_path_factory.mktemp("server")
    token_file = d / "token"
    token_file.write_text("test-token-7f3a\n")
    audit = d / "opened.jsonl"
    proc = start_server(served_run, token_file=token_file, audit_log=audit,
                        extra=("--max-batch", "64"))
    try:
        yield SimpleNamespace(proc=proc, url=proc.url, token="test-token-7f3a",
                              token_file=token_file, audit_log=audit, run=served_run)
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def local_ray():
    """One small local Ray for the test module: 2 CPUs, no dashboard (the module sets
    ``splitcem.study.trials.LOOPBACK_ENV`` before it imports Ray); shut down after it."""
    ray = pytest.importorskip("ray", reason="pip install 'splitcem[sweep]' (make setup does)")
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()
