"""A BYO model, end to end: the example's own CNN split, protected, trained in a plain loop,
audited, exported with splitcem.export, served by `splitcem serve` in its own process (which
never opens the client's files and has no user code), classified by `splitcem infer` from
another process, by Client and by the lens; and its edge client run by onnxruntime."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from _serving_utils import opened_files, start_server
from PIL import Image

import splitcem
from splitcem.serving import Client, ClientHalf
from splitcem.serving.deploy import CLIENT_FILE, SERVER_FILE, SPEC_FILE, read_spec
from splitcem.serving.edge import write_onnx
from splitcem.serving.halves import OnnxClientHalf
from splitcem.serving.program import ONNX_FILE, PROGRAM_FILES

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "examples"))
from small_cnn import SmallCNN  # noqa: E402  (the example's own model)

#: the edge extra (pip install 'splitcem[edge]'; make setup installs it)
HAS_EDGE = all(importlib.util.find_spec(m) is not None
               for m in ("onnx", "onnxscript", "onnxruntime"))
needs_edge = pytest.mark.skipif(not HAS_EDGE and os.environ.get("CI", "") not in ("1", "true"),
                                reason="needs the edge extra: pip install 'splitcem[edge]'")
MEAN, STD = (0.5, 0.45, 0.4), (0.25, 0.25, 0.25)
SIGMA = 0.1


def toy(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """16 x 16 images in [0, 1] whose colour depends on the class."""
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, 4, (n,), generator=g)
    base = torch.tensor([[0.8, 0.2, 0.2], [0.2, 0.8, 0.2], [0.2, 0.2, 0.8], [0.7, 0.7, 0.2]])
    x = base[y].view(n, 3, 1, 1) + 0.2 * torch.rand(n, 3, 16, 16, generator=g) - 0.1
    return x.clamp(0, 1), y


def norm(x01: torch.Tensor) -> torch.Tensor:
    return (x01 - torch.tensor(MEAN).view(1, 3, 1, 1)) / torch.tensor(STD).view(1, 3, 1, 1)


@pytest.fixture(scope="module")
def byo(tmp_path_factory):
    """(out dir, protected client, server, test images, labels) after a short training."""
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4)
    x, y = toy(128, 0)
    encoder, server = splitcem.split(model, at="features.9", example=norm(x[:16]))
    client = splitcem.protect(encoder, [{"name": "noise", "sigma": SIGMA}], cem=0.5,
                              num_classes=4, mean=MEAN, std=STD)
    opt = torch.optim.Adam([*client.parameters(), *server.parameters()], lr=3e-3)
    for _ in range(2):
        client.train()
        server.train()
        for xb, yb in zip(norm(x).split(32), y.split(32), strict=True):
            loss = F.cross_entropy(server(client(xb)), yb) + client.loss(yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
        client.epoch_end()
    out = tmp_path_factory.mktemp("byo") / "mine"
    xt, yt = toy(64, 1)
    with pytest.warns(UserWarning, match="scored images"):
        splitcem.audit(client, (xt, yt), attacks=[{"name": "decoder", "epochs": 1, "width": 8,
                                                   "depth": 1}], out=out, progress=False)
    d = splitcem.export(client, server, out, example=xt[:4], classes=["r", "g", "b", "y"],
                        onnx=HAS_EDGE or bool(os.environ.get("CI")))
    assert d == out / "deploy"
    client.eval()
    server.eval()
    return out, client, server, xt, yt


def test_the_deployment_has_programs_and_safetensors(byo):
    out, client, server, xt, _ = byo
    d = out / "deploy"
    spec = read_spec(d)
    assert spec["model"]["program"] == "torch.export"
    assert {f["path"] for f in spec["files"].values()} == {
        SERVER_FILE, CLIENT_FILE, PROGRAM_FILES["server"], PROGRAM_FILES["client"],
        *([ONNX_FILE] if HAS_EDGE else [])}
    assert spec["defense"]["transforms"] == [{"name": "noise", "sigma": SIGMA}]
    half = ClientHalf(d)
    with torch.no_grad():
        want = server(client.encoder(norm(xt)))
        got_z = half.encode(xt, defense=False)
    assert torch.allclose(got_z, client.encoder(norm(xt)).detach(), atol=1e-6)
    from safetensors.torch import load
    srv_keys = set(load((d / SERVER_FILE).read_bytes()))
    assert srv_keys == {f"server.{k}" for k in server.state_dict()}
    assert want.shape == (64, 4)


def test_served_from_another_process_which_never_opens_the_clients_files(byo, tmp_path):
    out, _, server, xt, _ = byo
    log = tmp_path / "opened.jsonl"
    proc = start_server(out, audit_log=log)
    try:
        with Client(out, proc.url) as c:
            z = c.half.encode(xt, defense=False)
            with torch.no_grad():
                want = server(z).argmax(1).tolist()
            assert c.infer_features(z).labels.tolist() == want
            assert len(c.classify(xt[:5])) == 5  # with the deployed noise
        png = tmp_path / "img.png"
        Image.fromarray((xt[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)).save(png)
        for extra in ([], ["--onnx"] if HAS_EDGE else []):  # `splitcem infer`, another shell
            res = subprocess.run(
                [sys.executable, "-m", "splitcem.cli", "infer", str(out), str(png), "--url",
                 proc.url, "--json", *extra], capture_output=True, text=True, timeout=300,
                cwd=REPO, check=False)
            assert res.returncode == 0, res.stderr[-2000:]
            ans = json.loads(res.stdout.strip().splitlines()[-1])
            assert ans["class"] in ("r", "g", "b", "y")
        from splitcem.lens import Lens

        lens = Lens(out, proc.url)
        assert lens.decoder is not None and lens.info()["warning"] == ""
        seen = lens.analyze(png.read_bytes())
        assert seen["reconstruction"] and seen["metrics"]["mse"] >= 0
        lens.client.close()
    finally:
        proc.stop()
    opened = {p for p in opened_files(log) if p.startswith(str(out.resolve()))}
    d = (out / "deploy").resolve()
    assert opened == {str(d / SPEC_FILE), str(d / SERVER_FILE), str(d / "server.pt2")}, opened
    # no user code either: the server process never saw examples/ on its path
    assert not any("small_cnn" in p for p in opened_files(log))


@needs_edge
def test_edge_client_in_onnxruntime(byo):
    out, _, server, xt, _ = byo
    d = out / "deploy"
    edge, half = OnnxClientHalf(d), ClientHalf(d)
    clean_onnx, clean_torch = edge.encode(xt, defense=False), half.encode(xt, defense=False)
    assert torch.allclose(clean_onnx, clean_torch, atol=1e-5)
    noisy = torch.stack([edge.encode(xt) for _ in range(4)])
    eps = noisy - clean_onnx
    assert abs(float(eps.mean())) < 0.005 and abs(float(eps.std()) - SIGMA) < 0.005
    assert float(eps[0].sub(eps[1]).abs().max()) > 0  # fresh draws per call
    with torch.no_grad():
        assert torch.equal(server(clean_onnx).argmax(1), server(clean_torch).argmax(1))


@needs_edge
def test_edge_client_refuses_non_gaussian_transforms(tmp_path):
    torch.manual_seed(0)
    model = SmallCNN(num_classes=4)
    x, _ = toy(8, 2)
    enc, srv = splitcem.split(model, at="features.9", example=norm(x))
    c = splitcem.protect(enc, [{"name": "topk", "ratio": 0.5}, {"name": "noise"}], mean=MEAN,
                         std=STD)
    d = splitcem.export(c, srv, tmp_path, example=x, classes=4)
    assert [s["name"] for s in read_spec(d)["defense"]["transforms"]] == ["topk", "noise"]
    with pytest.raises(splitcem.errors.ServingError, match=r"Gaussian noise.*topk"):
        write_onnx(d)
    half = ClientHalf(d)  # the torch client applies both, rebuilt by name
    topk = half.defenses.defenses[0]
    assert topk.name == "topk" and topk.ratio == 0.5
    kept = topk.transform(half.encode(x, defense=False))
    assert float((kept == 0).float().mean()) == pytest.approx(0.5, abs=0.02)


def test_export_refuses_a_forgotten_normalisation(tmp_path):
    model = SmallCNN(num_classes=4)
    x, _ = toy(8, 3)
    enc, srv = splitcem.split(model, at="features.9", example=norm(x))
    c = splitcem.protect(enc, ["noise"])
    c(norm(x))
    with pytest.raises(splitcem.errors.ConfigError, match="no mean=/std= was given"):
        splitcem.export(c, srv, tmp_path, example=x, classes=4)
