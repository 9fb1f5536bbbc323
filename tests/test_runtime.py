"""Per-machine choices: the numeric path (``amp`` / ``channels_last: auto``), threads, and
how progress is shown (bars on a terminal, a log line per epoch elsewhere).

Capabilities are mocked (torch's CPU probes, CUDA's compute capability), so each rule is
checked on any machine; the trainer and CLI tests then run for real on the CPU.
"""

from __future__ import annotations

import io
import json
import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import yaml

from splitcem import runtime
from splitcem._progress import bars_on
from splitcem.config import load_config
from splitcem.errors import ConfigError
from splitcem.runtime import (
    check_setting,
    default_threads,
    native_bf16,
    resolve_numeric_path,
    set_threads,
)


def _cpu(monkeypatch, cap: str, *, bf16: bool | None = False, amx: bool | None = False,
         mkldnn: bool = True) -> None:
    """Pretend torch reports capability ``cap``; None removes a probe (an older torch)."""
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: cap)
    for name, val in (("_is_avx512_bf16_supported", bf16), ("_is_amx_tile_supported", amx)):
        if val is None:
            monkeypatch.delattr(torch.cpu, name, raising=False)
        else:
            monkeypatch.setattr(torch.cpu, name, lambda v=val: v, raising=False)
    monkeypatch.setattr(torch.backends.mkldnn, "is_available", lambda: mkldnn)


@pytest.fixture
def restore_threads():
    """Tests that set threads give the process its threads (and unpinned state) back."""
    n, pinned = torch.get_num_threads(), runtime._pinned
    yield
    torch.set_num_threads(n)
    runtime._pinned = pinned


# ---- amp / channels_last: auto ------------------------------------------------------------


@pytest.mark.parametrize(("cap", "bf16", "amx", "amp", "cl"), [
    ("AVX512", True, False, True, True),     # AVX512-BF16: bf16 + channels-last
    ("AVX512", False, True, True, True),     # AMX alone counts as native
    ("AVX512", False, False, False, True),   # AVX-512 without bf16: float32
    ("AVX2", True, True, False, True),       # kernels held to AVX2: bf16 not native
    ("AVX2", False, False, False, True),     # the AMD EPYC: float32, channels-last
    ("DEFAULT", False, False, False, False),  # non-x86 / no SIMD: nothing measured, defaults
])
def test_auto_on_cpu_follows_the_capability(monkeypatch, cap, bf16, amx, amp, cl):
    _cpu(monkeypatch, cap, bf16=bf16, amx=amx)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # auto never warns
        path = resolve_numeric_path("auto", "auto", "cpu")
    assert (path.amp, path.channels_last) == (amp, cl)
    assert path.cpu_capability == cap and path.reason.startswith("auto on cpu")
    assert path.memory_format == (torch.channels_last if cl else torch.contiguous_format)


def test_a_missing_or_failing_probe_means_not_native(monkeypatch):
    _cpu(monkeypatch, "AVX512", bf16=None, amx=None)
    assert not native_bf16("cpu")

    def boom():
        raise RuntimeError("probe failed")

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", boom, raising=False)
    assert not native_bf16("cpu")
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", boom)
    assert runtime.cpu_capability() == "unknown" and not native_bf16("cpu")


def test_channels_last_needs_onednn_on_cpu(monkeypatch):
    _cpu(monkeypatch, "AVX512", bf16=True, mkldnn=False)
    assert not resolve_numeric_path("auto", "auto", "cpu").channels_last


@pytest.mark.parametrize(("cc", "amp"), [((9, 0), True), ((8, 0), True), ((7, 5), False)])
def test_auto_on_cuda_needs_ampere(monkeypatch, cc, amp):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: cc)
    path = resolve_numeric_path("auto", "auto", torch.device("cuda"))
    assert path.amp is amp and path.channels_last is amp  # NHWC goes with bf16 on CUDA


def test_auto_on_mps_is_float32_default_layout():
    path = resolve_numeric_path("auto", "auto", "mps")
    assert not path.amp and not path.channels_last
    with pytest.warns(RuntimeWarning, match="not supported on mps"):
        assert not resolve_numeric_path(True, "auto", "mps").amp


def test_explicit_settings_win(monkeypatch):
    _cpu(monkeypatch, "AVX512", bf16=True)
    path = resolve_numeric_path(False, False, "cpu")
    assert (path.amp, path.channels_last, path.reason) == (False, False, "set in the config")
    assert path.describe() == "float32"
    assert resolve_numeric_path("auto", False, "cpu").describe() == "bf16 autocast"
    _cpu(monkeypatch, "AVX2")
    path = resolve_numeric_path(True, True, "cpu")
    assert path.describe() == "bf16 autocast + channels-last" and path.bf16_via_float32


def test_amp_true_without_native_bf16(monkeypatch):
    """A CPU without bf16 units runs bf16 through float32 kernels (tests/test_bf16.py), at
    float32's speed, so it does not warn; a GPU without them warns that it is slower."""
    for cap in ("AVX2", "AVX512"):  # AVX512 without BF16 / AMX
        _cpu(monkeypatch, cap)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            path = resolve_numeric_path(True, "auto", "cpu")
        assert path.amp and path.bf16_via_float32
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with pytest.warns(RuntimeWarning, match="slower") as rec:
        path = resolve_numeric_path(True, "auto", torch.device("cuda"))
    assert path.amp and not path.bf16_via_float32 and "train.amp" in str(rec[0].message)


def test_quiet_resolves_the_same_path_without_warning(monkeypatch):
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    with pytest.warns(RuntimeWarning):  # amp: true warns here (no native bf16)
        loud = resolve_numeric_path(True, "auto", "cuda")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = resolve_numeric_path(True, "auto", "cuda", quiet=True)
        on_mps = resolve_numeric_path(True, "auto", "mps", quiet=True)
    assert quiet == loud and quiet.amp
    assert not on_mps.amp  # still switched off where bf16 autocast does not exist


def test_settings_are_validated():
    assert check_setting("x", "auto") == "auto" and check_setting("x", True) is True
    with pytest.raises(ConfigError, match="true, false or auto"):
        check_setting("train.amp", "yes")
    assert load_config({}).train.amp == "auto" and load_config({}).train.channels_last == "auto"
    assert load_config({"train": {"amp": False}}).train.amp is False
    with pytest.raises(ConfigError, match=r"train\.amp"):
        load_config({"train": {"amp": "fast"}})
    from splitcem.attacks import create_attack

    with pytest.raises(ConfigError, match="amp"):
        create_attack("decoder", amp="fast")


def test_shipped_configs_use_auto():
    repo = Path(__file__).resolve().parents[1]
    for path in sorted((repo / "configs").rglob("*.yaml")):
        raw = yaml.safe_load(path.read_text())
        train = raw.get("train") or {}
        assert train.get("amp", "auto") == "auto", path
        assert train.get("channels_last", "auto") == "auto", path
        for spec in (raw.get("attack") or {}).get("attacks") or []:
            assert spec.get("amp", "auto") == "auto", (path, spec)


def test_trainer_runs_the_resolved_path_and_records_it(tiny_config, tmp_path, monkeypatch):
    from splitcem.experiment import train_run

    _cpu(monkeypatch, "AVX2")  # a machine without native bf16: auto must train in float32
    cfg = tiny_config(train={"epochs": 1, "warmup_epochs": 0}, attack={"attacks": []})
    rec = train_run(cfg, tmp_path / "run", progress=False)
    num = rec["numerics"]
    assert (num["amp"], num["channels_last"], num["cpu_capability"]) == (False, True, "AVX2")
    assert num["path"] == "float32 + channels-last" and num["threads"] >= 1
    saved = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert saved["numerics"] == num
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "numerics: float32 + channels-last (auto on cpu (AVX2)" in summary


# ---- threads --------------------------------------------------------------------------------


def test_set_threads_explicit_env_and_default(monkeypatch, restore_threads):
    monkeypatch.setenv(runtime.ENV_THREADS, "1")
    assert set_threads() == 1 and torch.get_num_threads() == 1
    monkeypatch.setenv(runtime.ENV_THREADS, "two")
    with pytest.raises(ConfigError, match="SPLITCEM_THREADS must be a positive integer"):
        set_threads()
    monkeypatch.delenv(runtime.ENV_THREADS)
    monkeypatch.setattr(runtime, "default_threads", lambda: 2)
    assert set_threads() == 2 and torch.get_num_threads() == 2
    assert set_threads(1) == 1 and torch.get_num_threads() == 1
    with pytest.raises(ConfigError):
        set_threads(0)


def test_an_explicit_number_outranks_the_environment(monkeypatch, restore_threads):
    """--threads pins the count; without it, prepare() follows $SPLITCEM_THREADS (a sweep
    sets it per trial and needs nothing else)."""
    runtime._pinned = False
    monkeypatch.setenv(runtime.ENV_THREADS, "1")
    torch.set_num_threads(2)
    assert runtime.honour_env_threads() == 1 and torch.get_num_threads() == 1
    monkeypatch.delenv(runtime.ENV_THREADS)
    torch.set_num_threads(2)
    assert runtime.honour_env_threads() is None and torch.get_num_threads() == 2  # untouched
    set_threads(2)
    monkeypatch.setenv(runtime.ENV_THREADS, "1")
    assert runtime.honour_env_threads() is None and torch.get_num_threads() == 2


def test_prepare_honours_the_environment(tiny_config, monkeypatch, restore_threads):
    from splitcem.experiment import prepare

    runtime._pinned = False
    torch.set_num_threads(2)
    monkeypatch.setenv(runtime.ENV_THREADS, "1")
    prepare(tiny_config())
    assert torch.get_num_threads() == 1


@pytest.mark.parametrize(("cores", "quota", "busy", "want"), [
    (4, None, 0.1, 4),   # a quiet machine: every core
    (4, None, 1.2, 3),   # one busy process: leave its core alone
    (2, None, 1.0, 1),   # the case: 2 cores beside one busy job
    (2, None, 7.0, 1),   # never below 1
    (8, 2, 0.0, 2),      # a container's cgroup quota caps it
])
def test_default_threads(monkeypatch, cores, quota, busy, want):
    monkeypatch.setattr(runtime, "_affinity", lambda: set(range(cores)))
    monkeypatch.setattr(runtime, "_cgroup_quota", lambda: quota)
    monkeypatch.setattr(runtime, "busy_cores", lambda interval=0.25: busy)
    assert default_threads() == want


def test_cpu_jiffies_reads_only_our_cpus(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  300 0 0 900 0 0 0 0 0 0\n"
        "cpu0 100 0 50 400 50 0 0 0 0 0\n"      # busy 150 of 600
        "cpu1 200 0 0 100 0 0 0 0 0 0\n"        # busy 200 of 300
        "intr 12345\n")
    assert runtime._cpu_jiffies({0}, str(stat)) == (150, 600)
    assert runtime._cpu_jiffies({0, 1}, str(stat)) == (350, 900)
    assert runtime._cpu_jiffies({0}, str(tmp_path / "missing")) is None


# ---- progress: bars on a terminal, one log line per epoch otherwise -------------------------


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_bars_only_on_a_terminal(monkeypatch):
    monkeypatch.setattr(sys, "stderr", _Tty())
    assert bars_on(True) and not bars_on(False)
    monkeypatch.setattr(sys, "stderr", io.StringIO())
    assert not bars_on(True)


@pytest.mark.parametrize("tty", [True, False])
def test_training_progress_bar_or_log_lines(tiny_config, monkeypatch, caplog, tty):
    from splitcem.experiment import prepare
    from splitcem.train import Trainer

    err = _Tty() if tty else io.StringIO()
    monkeypatch.setattr(sys, "stderr", err)
    cfg = tiny_config(train={"epochs": 2, "warmup_epochs": 0})
    p = prepare(cfg)
    with caplog.at_level(logging.INFO, logger="splitcem.train"):
        Trainer(p.model, p.stack, p.splits, cfg.train, device=p.device, seed=0).fit()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    if tty:
        assert "\r" in err.getvalue() and "epoch 1/2" in err.getvalue()  # a redrawn bar
        assert lines == []
    else:
        assert err.getvalue() == ""  # no bar at all
        assert [ln.split(":")[0] for ln in lines] == ["epoch 1/2", "epoch 2/2"]
        assert "test acc" in lines[-1] and "img/s" in lines[-1]


def test_decoder_attack_logs_one_line_per_epoch(cifar_splits, monkeypatch, caplog):
    from splitcem.attacks import AttackTarget, ThreatModel, run_attacks
    from splitcem.models import create_split_model

    monkeypatch.setattr(sys, "stderr", io.StringIO())
    client = create_split_model("vgg11_bn", num_classes=10, client_width=0.25).client
    target = AttackTarget(client, None, cifar_splits.train.info)
    with caplog.at_level(logging.INFO, logger="splitcem.attacks"):  # training.py logs it
        rep = run_attacks(target, cifar_splits,
                          [{"name": "decoder", "epochs": 3, "width": 8, "depth": 0}],
                          threat=ThreatModel(setting="inference", heldout_limit=16))
    lines = [r.getMessage() for r in caplog.records if " epoch " in r.getMessage()]
    assert [ln.split(":")[0] for ln in lines] == [f"decoder epoch {i}/3" for i in (1, 2, 3)]
    assert sys.stderr.getvalue() == ""
    assert "numerics" in rep.results["decoder"].extra


# ---- the command line -----------------------------------------------------------------------


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.run([sys.executable, "-m", "splitcem.cli", *args], env=env,
                           capture_output=True, text=True, timeout=300, **kw)


def test_cli_threads_flag_and_piped_output(tiny_config, tmp_path):
    cfg = tiny_config(train={"epochs": 2, "warmup_epochs": 0}, attack={"attacks": []})
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg.to_dict()))
    done = _cli("train", str(path), "--out", str(tmp_path / "run"), "--threads", "1")
    assert done.returncode == 0, done.stderr[-2000:]
    assert "\r" not in done.stderr  # piped: no bar redraws
    assert sum(ln.split(": ", 1)[-1].startswith("epoch ") for ln in
               done.stderr.splitlines()) == 2, done.stderr
    rec = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert rec["numerics"]["threads"] == 1


def test_yaml_syntax_error_is_one_line_with_the_file_name(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\ntrain: {epochs: 2\nmodel: [\n")
    done = _cli("run", str(bad))
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith(f"error: config file {bad} is not valid YAML at line 3")
    assert "fix the syntax" in lines[0] and "<unicode string>" not in lines[0]


def test_bad_yaml_in_an_override_is_a_config_error():
    with pytest.raises(ConfigError, match=r"override 'train=\{a: \[' is not valid YAML"):
        load_config({}, ["train={a: ["])


# ---- the demo -------------------------------------------------------------------------------


def test_demo_sweep_is_a_paired_frontier_and_noise_runs_carry_no_cem():
    from splitcem.experiment import build_defenses
    from splitcem.study.demo import DEMO_CEM_LAMBDAS, DEMO_SEEDS, DEMO_SIGMAS, demo_sweep
    from splitcem.study.grid import expand, load_sweep

    trials = expand(load_sweep(demo_sweep(undefended=True)))
    by = {t.name: t for t in trials}
    s0 = DEMO_SEEDS[0]
    assert set(by) == {f"undefended_s{s0}"} | {
        f"noise{s:g}_s{k}" for s in DEMO_SIGMAS for k in DEMO_SEEDS} | {
        f"noise0.1_cem{lam:g}_s{k}" for lam in DEMO_CEM_LAMBDAS for k in DEMO_SEEDS}
    assert len(DEMO_SEEDS) >= 2 and min(DEMO_SIGMAS) == 0.1 and len(DEMO_SIGMAS) >= 2
    assert by[f"undefended_s{s0}"].cfg.defenses == [] and by[f"undefended_s{s0}"].cfg.cem is None
    labels = {n: build_defenses(t.cfg).describe() for n, t in by.items()}
    assert labels[f"noise0.3_s{s0}"] == "noise(sigma=0.3)"  # no cem(lam=0.0) on noise alone
    assert not any("lam=0" in v for v in labels.values())
    cem = by[f"noise0.1_cem{DEMO_CEM_LAMBDAS[0]:g}_s{s0}"].cfg
    noise = by[f"noise0.1_s{s0}"].cfg
    assert cem.cem is not None and cem.cem.lam == DEMO_CEM_LAMBDAS[0] > 0
    assert noise.defenses == cem.defenses and noise.cem is None
    assert noise.train == cem.train and noise.model == cem.model and noise.data == cem.data


def test_demo_end_to_end_at_tiny_size(fashion_dir, tmp_path, cache_dir, monkeypatch):
    """The real demo pipeline (a tiny frontier: noise at three sigmas and CEM, two paired
    seeds, one undefended run; the matched-accuracy comparison, the plot) on a few hundred
    images."""
    import splitcem.study.demo as demo
    from splitcem.study.frontier import LESS, MORE, UNDECIDED

    drawn = {}

    def spy(series, path, **kw):
        drawn.update(series)
        return real(series, path, **kw)

    real = demo.plot_curves
    monkeypatch.setattr(demo, "plot_curves", spy)
    tiny = ["data.limit_train=1024", "data.limit_test=200", f"data.cache_dir={cache_dir}",
            "model.client_width=0.25", "train.epochs=4", "device=cpu",
            "attack.attacks=[{name: decoder, epochs: 1, width: 8, depth: 0}]"]
    # sigma 0.02 and 1.5 bracket CEM's accuracy, so a comparison exists: with four epochs the
    # runs learn (about 67% against 18% at sigma 1.5; CEM lambda 30 about 40%); with two they
    # sat near chance on a float32 machine and CEM fell outside the noise curve's range
    text = demo.run_demo(out=tmp_path, progress=False, overrides=tiny,
                         sigmas=(0.02, 0.1, 1.5), lambdas=(30.0,), seeds=(125, 126),
                         undefended=True, use_ray=False)
    assert (tmp_path / "comparison.md").read_text().strip() == text.strip()
    assert "cem(lam=0" not in text and "| noise 1.5 | noise(sigma=1.5) | 125, 126 |" in text
    assert "| undefended | none | 125 |" in text
    verdict = json.loads((tmp_path / "comparison.json").read_text())["comparisons"][
        "noise 0.1 + CEM lambda 30"]
    assert verdict["verdict"] in (MORE, LESS, UNDECIDED) and verdict["n_seeds"] == 2, text
    assert verdict["paired"] and f"-> {verdict['verdict'].upper()}" in text
    if verdict["verdict"] == UNDECIDED:
        assert "deciding it would need" in text
    else:
        assert verdict["low"] > 0 or verdict["high"] < 0
    png = (tmp_path / "frontier.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert [p.label for p in drawn[demo.BASELINE]] == ["0.02", "0.1", "1.5"]
    assert [p.label for p in drawn[demo.CEM]] == ["0", "30"]  # starts at noise 0.1 alone
    rec = json.loads((tmp_path / "noise0.1_cem30_s126" / "metrics.json").read_text())
    assert rec["cem_lambda"] == 30 and "loss/cem" in rec["train"]["history"][-1]
    assert json.loads((tmp_path / "noise0.1_s126" / "metrics.json").read_text())[
        "defenses"] == "noise(sigma=0.1)"


# ---- CUDA only (benchmarks/gpu_check.sh runs these with -k cuda) -----------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@needs_cuda
def test_cuda_auto_path_trains(tiny_config):
    from splitcem.experiment import prepare
    from splitcem.train import Trainer

    cfg = tiny_config(device="cuda", train={"epochs": 1, "warmup_epochs": 0},
                      defenses=[{"name": "noise", "sigma": 0.1}])
    p = prepare(cfg)
    res = Trainer(p.model, p.stack, p.splits, cfg.train, device=p.device, seed=0,
                  progress=False).fit()
    native = torch.cuda.get_device_capability()[0] >= 8
    assert res.numerics["amp"] is native and res.numerics["channels_last"] is native
    assert res.history[-1]["train_loss"] == res.history[-1]["train_loss"]  # not NaN
    print(f"\ncuda auto path: {res.numerics['path']} ({res.numerics['reason']})")


@needs_cuda
def test_cuda_cem_step_never_syncs_with_the_host(tiny_config):
    """Per step, the noise defense and CEM's loss (forward and backward) never wait for the
    GPU; CEM's host syncs are all in its epoch-end refit (counted and printed here)."""
    import torch.nn.functional as F

    from splitcem.defenses import EpochContext, StepContext
    from splitcem.experiment import prepare
    from splitcem.train import Trainer

    cfg = tiny_config(device="cuda", train={"epochs": 2, "warmup_epochs": 0},
                      defenses=[{"name": "noise", "sigma": 0.1}], cem={"lambda": 1.0})
    p = prepare(cfg)
    tr = Trainer(p.model, p.stack, p.splits, cfg.train, device=p.device, seed=0,
                 progress=False)
    tr.train_epoch()  # epoch 0: banks the features, fits the mixture at its end
    tr.epoch += 1
    cem = next(d for d in p.stack if d.name == "cem")
    assert cem.is_fitted
    tr.loader.set_epoch(1)
    x, y = next(iter(tr.loader))
    model = tr.model
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host sync raises
    try:
        for step in range(3):
            z = model.client(x).float()
            zs = p.stack.transform(z)
            logits = model.server(zs)
            ctx = StepContext(x=x, y=y, z_clean=z, z_sent=zs, model=model, epoch=1,
                              step=step, lr=0.05)
            extra, _ = p.stack.loss(ctx)
            assert extra is not None  # CEM's loss is active
            (F.cross_entropy(logits.float(), y) + extra).backward()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            p.stack.on_epoch_end(EpochContext(model=model, epoch=1, device=p.device,
                                              train_batches=tr._eval_batches, metrics={}))
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = sum("synchroniz" in str(w.message) for w in seen)
    print(f"\ncuda: CEM per step 0 host syncs; epoch-end refit {syncs} host syncs")
