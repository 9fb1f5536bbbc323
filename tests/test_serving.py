"""Deployed split inference with real processes on loopback: ``splitcem serve`` in its own
process, the real client (``splitcem.serving.Client`` and ``splitcem infer``), a tiny run
trained on real CIFAR-10 images (the ``served_run`` / ``serving`` fixtures in conftest)."""

from __future__ import annotations

import ast
import http.client
import json
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from _serving_utils import RecordingProxy, opened_files, start_server
from PIL import Image

from splitcem.errors import ServingError, SpecMismatchError
from splitcem.serving import Client, ServerConnection, ServerHalf, export_run
from splitcem.serving.deploy import CLIENT_FILE, SERVER_FILE, SPEC_FILE, read_spec
from splitcem.serving.wire import BINARY, JSON, encode_features

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def reference(served_run):
    """The run rebuilt in-process (training code), and 64 real test images in [0, 1]."""
    from splitcem.experiment import load_trained

    p = load_trained(served_run, device="cpu")
    x01 = torch.from_numpy(p.splits.test.images[:64]).permute(0, 3, 1, 2).float() / 255
    return p, x01


def _in_process_probs(p, z: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return torch.softmax(p.model.server(z).double(), dim=1)


def _client(serving, **kw) -> Client:
    return Client(serving.run, serving.url, token=serving.token, **kw)


def _tensors_in(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load

    return load(path.read_bytes())


# ---------------------------------------------------------------- the two halves

def test_export_writes_disjoint_halves(served_run, reference, tmp_path):
    p, _ = reference
    out = export_run(served_run, tmp_path / "dep")
    server_t, client_t = _tensors_in(out / SERVER_FILE), _tensors_in(out / CLIENT_FILE)
    ckpt = p.model.state_dict()
    assert set(server_t) == {k for k in ckpt if k.startswith("server.")}
    assert {k for k in client_t if k.startswith("client.")} == {
        k for k in ckpt if k.startswith("client.")}
    # no client tensor hides in the server file under another name
    client_w = [v for k, v in ckpt.items() if k.startswith("client.") and v.numel() > 1]
    for v in server_t.values():
        assert not any(v.shape == c.shape and torch.equal(v, c) for c in client_w)
    spec = read_spec(out)
    assert spec["features"]["shape"] == [8, 8, 8] and len(spec["classes"]) == 10
    assert spec["defense"]["transforms"] == [{"name": "noise", "sigma": 0.1}]
    assert spec["defense"]["noise_sigma"] == pytest.approx(0.1)
    assert spec["model_id"].startswith("tiny_served@")
    # deterministic: the same checkpoint gives the same model id
    assert read_spec(export_run(served_run, tmp_path / "again"))["model_id"] == spec["model_id"]
    half = ServerHalf(out)
    assert half.loaded_keys == sorted(server_t)
    assert all(k.startswith("server.") for k in half.loaded_keys)


def test_halves_refuse_foreign_or_tampered_files(served_run, tmp_path):
    out = export_run(served_run, tmp_path / "dep")
    # a server file swapped for the client file: hash mismatch, refused before parsing
    shutil.copy(out / CLIENT_FILE, out / SERVER_FILE)
    with pytest.raises(ServingError, match="SHA-256 differs"):
        ServerHalf(out)
    # a spec that vouches for a server file holding client tensors: refused by key
    spec = json.loads((out / SPEC_FILE).read_text())
    from splitcem.serving.deploy import sha256_bytes

    spec["files"]["server"]["sha256"] = sha256_bytes((out / SERVER_FILE).read_bytes())
    (out / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(ServingError, match="not the server's"):
        ServerHalf(out)


def test_client_half_applies_every_deployed_transform_in_order(tmp_path):
    """A stack of filter + noise + a loss-only defense: the client applies the first two,
    in order, in eval mode; the spec's contract lists exactly those."""
    from splitcem.data.info import DatasetInfo
    from splitcem.defenses import DefenseStack, create_defense
    from splitcem.models import create_split_model
    from splitcem.serving import ClientHalf, export_model
    from splitcem.serving.export import transforms_features

    torch.manual_seed(0)
    model = create_split_model("vgg11_bn", num_classes=3, image_size=16, client_width=0.25,
                               server_width=0.25).eval()
    info = DatasetInfo("toy", 3, 3, 16, (0.5,) * 3, (0.25,) * 3, ("a", "b", "c"))
    specs = [{"name": "topk", "ratio": 0.25}, {"name": "noise", "sigma": 0.05},
             {"name": "nopeek", "weight": 0.1}]
    defs = [create_defense(s["name"], **{k: v for k, v in s.items() if k != "name"})
            for s in specs]
    pairs = [(s, d) for s, d in zip(specs, defs, strict=True) if transforms_features(d)]
    assert [s["name"] for s, _ in pairs] == ["topk", "noise"]
    out = export_model(model, tmp_path / "dep", info=info, name="toy", transforms=pairs)
    half = ClientHalf(out)
    assert read_spec(out)["defense"]["describe"] == "topk(ratio=0.25) + noise(sigma=0.05)"
    x01 = torch.rand(4, 3, 16, 16)
    torch.manual_seed(1)
    got = half.encode(x01)
    torch.manual_seed(1)
    with torch.no_grad():
        want = DefenseStack([d for _, d in pairs]).eval().transform(
            model.client(info.normalize(x01)))
    assert torch.equal(got, want)
    kept = (half.encode(x01, defense=False).abs() > 0).flatten(1).sum(1)
    assert (kept > 4 * 4 * 8 // 4).all()  # the clean encoding is dense; topk would cut it


def test_cli_export_and_staleness(served_run, tmp_path):
    import os

    from typer.testing import CliRunner

    from splitcem.cli import app
    from splitcem.serving.export import is_stale

    run = tmp_path / "run"
    shutil.copytree(served_run, run, ignore=shutil.ignore_patterns("deploy"))
    assert is_stale(run)  # no deployment yet
    res = CliRunner().invoke(app, ["export", str(run)])
    assert res.exit_code == 0, res.output
    assert "server.safetensors + spec.json go to the server" in res.output
    assert not is_stale(run)
    ckpt = run / "checkpoints" / "last.pt"
    st = ckpt.stat()
    os.utime(ckpt, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))  # a newer checkpoint
    assert is_stale(run)
    res = CliRunner().invoke(app, ["export", str(tmp_path / "nothing")])
    assert res.exit_code != 0 and "not a run directory" in str(res.exception)


def test_serving_package_imports_no_training_or_attack_code():
    banned = ("splitcem.train", "splitcem.experiment", "splitcem.attacks", "splitcem.report",
              "splitcem.sweep", "splitcem.lens", "splitcem.cem")
    for path in (REPO / "splitcem" / "serving").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            bad = [n for n in names if n.startswith(banned)]
            assert not bad, f"{path.name} imports {bad}"


# the serving package's internal order (issue 17): each module imports only modules of a
# lower level, lazy imports included; so export never imports the client or the server, and
# neither of those imports the other
SERVING_LEVELS = {
    "wire": 0, "deploy": 0, "auth": 0, "transport": 0,
    "protocol": 1, "metrics": 1, "batching": 1, "program": 1,
    "halves": 2,
    "export": 3,
    "client": 4, "server": 4, "edge": 4,
    "byo": 5,
    "__init__": 6,
}


def _serving_imports(path: Path) -> set[str]:
    """Names of the splitcem.serving modules ``path`` imports, anywhere in the file."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            mods = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = "splitcem.serving" + (f".{node.module}" if node.module else "")
                mods = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                mods = [node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
        else:
            continue
        for m in mods:
            parts = m.split(".")
            if parts[:2] == ["splitcem", "serving"] and len(parts) > 2 and \
                    parts[2] in SERVING_LEVELS:
                out.add(parts[2])
    return out


def test_serving_import_order():
    files = sorted((REPO / "splitcem" / "serving").glob("*.py"))
    assert {f.stem for f in files} == set(SERVING_LEVELS), "give a new module its level"
    bad = [(f.stem, m) for f in files for m in sorted(_serving_imports(f))
           if SERVING_LEVELS[m] >= SERVING_LEVELS[f.stem]]
    assert not bad, f"imports against the serving order (module, imported): {bad}"
    # the walk sees lazy imports: export checks its output with the halves inside a function
    assert "halves" in _serving_imports(REPO / "splitcem" / "serving" / "export.py")


def test_server_process_opens_only_the_server_half(serving):
    _client(serving).close()  # at least one spec request served
    opened = opened_files(serving.audit_log)
    run = str(serving.run.resolve())
    in_run = {p for p in opened if p.startswith(run)}
    deploy = serving.run.resolve() / "deploy"
    assert str(deploy / SERVER_FILE) in in_run
    assert in_run <= {str(deploy / SERVER_FILE), str(deploy / SPEC_FILE)}, in_run
    assert not any(p.endswith((CLIENT_FILE, ".pt")) for p in opened)


def test_server_runs_from_the_server_files_alone(serving, reference, tmp_path):
    p, x01 = reference
    only = tmp_path / "server_only"
    only.mkdir()
    for f in (SPEC_FILE, SERVER_FILE):
        shutil.copy(serving.run / "deploy" / f, only / f)
    proc = start_server(only)
    try:
        conn = ServerConnection(proc.url)
        z = _client(serving).half.encode(x01[:8], defense=False)
        ans = conn.infer_bytes(encode_features(z))
        assert ans["labels"] == _in_process_probs(p, z).argmax(1).tolist()
        conn.close()
    finally:
        proc.stop()


# ---------------------------------------------------------------- answers

def test_health_and_spec(serving):
    conn = ServerConnection(serving.url)
    assert conn.health() == {"status": "ok"}  # no token needed, and nothing else said
    with pytest.raises(ServingError, match=r"401.*bearer token"):
        conn.spec()
    spec = ServerConnection(serving.url, token=serving.token).spec()
    assert spec["feature_shape"] == [8, 8, 8] and spec["features"]["dtypes"] == [
        "float32", "float16"]
    assert spec["defense"] == {"transforms": [{"name": "noise", "sigma": 0.1}],
                               "noise_sigma": 0.1}
    assert spec["classes"][0] == "airplane" and spec["limits"]["max_batch"] == 64


def test_predictions_equal_in_process_model_without_noise(serving, reference):
    p, x01 = reference
    with _client(serving) as c:
        z = c.half.encode(x01, defense=False)  # clean features (noise off)
        with torch.no_grad():
            assert torch.allclose(z, p.model.client(p.splits.train.info.normalize(x01)),
                                  atol=1e-6)
        want = _in_process_probs(p, z)
        got = c.infer_features(z)
        assert torch.equal(got.labels, want.argmax(1))
        assert torch.allclose(got.probs, want, atol=1e-6)
        small = c.infer_features(z[:4], as_json=True)  # JSON path: the same answer
        assert torch.equal(small.labels, want[:4].argmax(1))
        assert torch.allclose(small.probs, want[:4], atol=1e-6)
    with _client(serving, dtype="float16") as c16:  # half the bytes, nearly the same answer
        assert torch.allclose(c16.infer_features(z).probs, want, atol=5e-3)


def test_noise_on_matches_in_process_seed_for_seed_and_in_distribution(serving, reference):
    p, x01 = reference
    with _client(serving) as c:
        torch.manual_seed(123)
        z_sent = c.encode(x01)
        with torch.no_grad():
            torch.manual_seed(123)  # the same draw in-process: the same answer
            z_ref = p.stack.transform(p.model.client(p.splits.train.info.normalize(x01)))
        assert torch.allclose(z_sent, z_ref, atol=1e-6)
        assert torch.allclose(c.infer_features(z_sent).probs, _in_process_probs(p, z_ref),
                              atol=1e-6)
        clean = c.half.encode(x01, defense=False)
        noise = z_sent - clean
        assert abs(noise.std().item() - 0.1) < 0.005 and abs(noise.mean().item()) < 0.005
        # independent draws: the distribution of answers agrees with the in-process model
        served, local = [], []
        for _ in range(6):
            served.append(c.infer_features(c.encode(x01)).probs)
            with torch.no_grad():
                z = p.stack.transform(p.model.client(p.splits.train.info.normalize(x01)))
            local.append(_in_process_probs(p, z))
    s, lo = torch.cat(served), torch.cat(local)  # (384, 10) each
    assert not torch.allclose(s[:64], s[64:128])  # fresh noise per request
    assert (s.mean(0) - lo.mean(0)).abs().max() < 0.01  # class-probability means agree
    clean_labels = _in_process_probs(p, clean).argmax(1).repeat(6)
    flips_s = (s.argmax(1) != clean_labels).float().mean().item()
    flips_l = (lo.argmax(1) != clean_labels).float().mean().item()
    assert abs(flips_s - flips_l) < 0.08, (flips_s, flips_l)


def test_concurrent_clients_get_their_own_answers(serving, reference):
    p, x01 = reference
    with _client(serving) as c:
        zs = [c.half.encode(x01[i * 8:(i + 1) * 8], defense=False) for i in range(8)]
    want = [_in_process_probs(p, z).argmax(1).tolist() for z in zs]
    errors: list[str] = []
    barrier = threading.Barrier(8, timeout=60)

    def worker(i: int) -> None:
        conn = ServerConnection(serving.url, token=serving.token)
        try:
            barrier.wait()
            for _ in range(10):
                ans = conn.infer_bytes(encode_features(zs[i]))
                if ans["labels"] != want[i]:
                    errors.append(f"client {i}: {ans['labels']} != {want[i]}")
        except Exception as e:
            errors.append(f"client {i}: {e!r}")
        finally:
            conn.close()

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not errors, errors


# ---------------------------------------------------------------- bad input

def _raw(url: str, method: str, path: str, body: bytes | None, headers: dict[str, str]
         ) -> tuple[int, dict]:
    host, port = url.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
    finally:
        conn.close()
    try:
        return resp.status, json.loads(data)
    except ValueError:
        return resp.status, {"raw": data[:200].decode("latin-1")}


def _hdr(token: str | None, ctype: str | None = BINARY, **extra: str) -> dict[str, str]:
    h = dict(extra)
    if token is not None:
        h["Authorization"] = f"Bearer {token}"
    if ctype is not None:
        h["Content-Type"] = ctype
    return h


def _reference_answer(serving, z) -> list:
    return ServerConnection(serving.url, token=serving.token).infer_bytes(
        encode_features(z))["probs"]


def test_bad_input_gets_4xx_saying_what_was_expected(serving, reference):
    _, x01 = reference
    tok = serving.token
    z = Client(serving.run, serving.url, token=tok).half.encode(x01[:4], defense=False)
    before = _reference_answer(serving, z)
    good = encode_features(z)
    wrong_shape = encode_features(torch.rand(2, 8, 8, 9))
    nan = encode_features(torch.full((2, 8, 8, 8), float("nan")))
    inf = encode_features(torch.full((2, 8, 8, 8), float("inf")))
    empty = encode_features(np.zeros((0, 8, 8, 8), np.float32))
    too_many = encode_features(torch.rand(65, 8, 8, 8))  # --max-batch 64: over the body limit
    claims_too_many = too_many[:24 + 8 * 8 * 8 * 4]  # a header saying 65, one sample of data
    bad_dtype = good[:4] + b"\x07" + good[5:]
    limit = ServerConnection(serving.url, token=tok).spec()["limits"]["max_body_bytes"]
    cases = [
        ("wrong shape", wrong_shape, _hdr(tok), 422,
         "expected (B, 8, 8, 8)"),
        ("wrong dtype", bad_dtype, _hdr(tok), 422, "1 = float32, 2 = float16"),
        ("NaN", nan, _hdr(tok), 422, "NaN or infinite"),
        ("inf", inf, _hdr(tok), 422, "NaN or infinite"),
        ("empty batch", empty, _hdr(tok), 422, "empty batch"),
        ("batch over limit", claims_too_many, _hdr(tok), 422, "limit of 64"),
        ("batch over the body limit", too_many, _hdr(tok), 413, "at most 64 samples"),
        ("oversize body", b"\0" * (limit + 1), _hdr(tok), 413, f"limit of {limit}"),
        ("truncated", good[:-7], _hdr(tok), 400, "truncated"),
        ("garbage", bytes(range(256)) * 4, _hdr(tok), 400, "SCF1"),
        ("wrong content type", good, _hdr(tok, "image/png"), 415, BINARY),
        ("no content type", good, _hdr(tok, None), 415, BINARY),
        ("bad JSON", b'{"features": [1,', _hdr(tok, JSON), 400, "not valid JSON"),
        ("missing token", good, _hdr(None), 401, "missing bearer token"),
        ("wrong token", good, _hdr("nope"), 401, "wrong bearer token"),
        ("spec mismatch", good, _hdr(tok, **{"X-Splitcem-Model": "other@000"}), 409,
         "serves model"),
    ]
    for name, body, headers, status, says in cases:
        got, ans = _raw(serving.url, "POST", "/v1/infer", body, headers)
        assert got == status, (name, got, ans)
        assert says in ans.get("detail", ""), (name, ans)
        # ... and the server keeps answering correctly
        assert _reference_answer(serving, z) == before, name
    got, _ = _raw(serving.url, "GET", "/v1/infer", None, _hdr(tok))
    assert got == 405
    assert serving.proc.alive()


def test_client_refuses_a_server_with_another_contract(serving, served_run, tmp_path):
    dep = tmp_path / "dep"
    shutil.copytree(served_run / "deploy", dep)
    spec = json.loads((dep / SPEC_FILE).read_text())
    spec["defense"]["transforms"] = [{"name": "noise", "sigma": 0.05}]
    spec["defense"]["noise_sigma"] = 0.05
    (dep / SPEC_FILE).write_text(json.dumps(spec))
    with pytest.raises(SpecMismatchError, match="defense: server"):
        Client(dep, serving.url, token=serving.token)
    spec["model_id"] = "someone_else@123"
    (dep / SPEC_FILE).write_text(json.dumps(spec))
    c = Client(dep, serving.url, token=serving.token, check=False)  # skip the check: the
    with pytest.raises(SpecMismatchError, match="409"):  # server refuses by model id
        c.infer_features(torch.rand(1, 8, 8, 8))


def test_fuzz_thousands_of_bodies_no_5xx_and_answers_unchanged(serving, reference):
    """Random and mutated bodies on loopback, bounded in count (2,500) and time (150 s)."""
    _, x01 = reference
    tok = serving.token
    z = Client(serving.run, serving.url, token=tok).half.encode(x01[:4], defense=False)
    before = _reference_answer(serving, z)
    seeds = [encode_features(z), encode_features(z[:1], "float16"),
             json.dumps({"features": z[:2].tolist()}).encode()]
    rng = np.random.default_rng(0)
    ctypes = [BINARY, BINARY, BINARY, JSON, JSON, "text/plain", "", BINARY + "; x=1"]
    statuses: dict[int, int] = {}
    conn = ServerConnection(serving.url, token=tok)
    deadline = time.monotonic() + 150
    n = 0
    for n in range(1, 2501):  # noqa: B007  (n is reported)
        kind = rng.integers(6)
        body = bytearray(seeds[rng.integers(len(seeds))])
        if kind == 0:  # random bytes
            body = bytearray(rng.bytes(int(rng.integers(0, 4096))))
        elif kind == 1:  # bit flips
            for _ in range(int(rng.integers(1, 8))):
                i = int(rng.integers(len(body)))
                body[i] ^= 1 << int(rng.integers(8))
        elif kind == 2:  # truncate or extend
            cut = int(rng.integers(len(body) + 1))
            body = body[:cut] + bytearray(rng.bytes(int(rng.integers(0, 64))))
        elif kind == 3:  # a header field set to a random value
            i = int(rng.integers(min(24, len(body))))
            body[i] = int(rng.integers(256))
        elif kind == 4:  # random shape in a valid header
            shape = [int(v) for v in rng.integers(0, 70, size=4)]
            body = bytearray(b"SCF1" + bytes([int(rng.integers(1, 3)), 4, 0, 0]) +
                             np.array(shape, "<u4").tobytes() +
                             rng.bytes(int(rng.integers(0, 8192))))
        else:  # JSON-looking junk
            parts = [b'{"features": ', b"[", b"]", b"1e999", b"NaN", b'"x"', b",", b"-0",
                     b"{}", b"null", b"0.5"]
            body = bytearray(b"".join(parts[int(i)] for i in
                                      rng.integers(len(parts), size=int(rng.integers(1, 60)))))
        headers = {"Content-Type": str(rng.choice(ctypes))}
        status, _ = conn.request("POST", "/v1/infer", bytes(body), headers)
        statuses[status] = statuses.get(status, 0) + 1
        if time.monotonic() > deadline:
            break
    conn.close()
    assert n >= 1000, f"only {n} requests in the time bound"
    assert not [s for s in statuses if s >= 500], statuses
    assert set(statuses) <= {200, 400, 413, 415, 422}, statuses
    assert sum(v for s, v in statuses.items() if s >= 400) > n // 2  # mostly refused
    assert _reference_answer(serving, z) == before
    assert serving.proc.alive()


# ---------------------------------------------------------------- the raw image stays home

def test_raw_image_never_crosses_the_wire(serving, reference, tmp_path):
    p, x01 = reference
    paths = []
    for i in range(3):
        path = tmp_path / f"img{i}.png"
        Image.fromarray((x01[i].permute(1, 2, 0) * 255).round().byte().numpy()).save(path)
        paths.append(path)
    proxy = RecordingProxy(serving.proc.port)
    try:
        out = subprocess.run(
            [sys.executable, "-m", "splitcem.cli", "infer", str(serving.run), *map(str, paths),
             "--url", proxy.url, "--token-file", str(serving.token_file)],
            capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr
        seen = proxy.received()
    finally:
        proxy.close()
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 3 and all(ln.startswith(str(paths[i])) for i, ln in enumerate(lines))
    assert all(any(f": {c} (" in ln for c in p.splits.test.info.classes) for ln in lines)
    # what the server received: a spec request and one infer request of features only
    assert seen.count(b"GET /v1/spec ") == 1 and seen.count(b"POST /v1/infer ") == 1
    body = seen.split(b"POST /v1/infer ", 1)[1].split(b"\r\n\r\n", 1)[1]
    assert body[:4] == b"SCF1" and len(body) == 24 + 3 * 8 * 8 * 8 * 4  # 2048 B per image
    sent = np.frombuffer(body, "<f4", offset=24).reshape(3, 8, 8, 8)
    clean = Client(serving.run, serving.url, token=serving.token).half.encode(
        x01[:3], defense=False).numpy()
    assert 0.08 < float((sent - clean).std()) < 0.12  # the client's noise was on them
    for i, path in enumerate(paths):
        u8 = (x01[i].permute(1, 2, 0) * 255).round().byte().numpy()  # (H, W, C)
        forms = [path.read_bytes(), u8.tobytes(), x01[i].numpy().tobytes(),
                 x01[i].permute(1, 2, 0).numpy().tobytes(),
                 p.splits.train.info.normalize(x01[i:i + 1]).numpy().tobytes(),
                 x01[i].half().numpy().tobytes()]
        forms += [u8[r].tobytes() for r in range(u8.shape[0])]  # any one row of pixels
        for f in forms:
            assert f not in seen
