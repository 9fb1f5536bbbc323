"""The privacy lens: the attack stage saves its strongest decoder, the lens back end shows
exactly what the server got and what that decoder rebuilds from it, and the page works in
a real headless browser (Debian's chromium + chromedriver, driven by selenium)."""

from __future__ import annotations

import base64
import http.client
import io
import json
import os
import re
import shutil
import tempfile
import threading
import time

import numpy as np
import pytest
import torch
from _ports import free_port_block
from _serving_utils import Proc, RecordingProxy, start_server
from PIL import Image

from splitcem.attacks.decoder import ResDecoder, decode, load_decoder
from splitcem.errors import ServingError
from splitcem.experiment import ATTACK_DECODER, attack_run, load_trained
from splitcem.metrics import image_metrics
from splitcem.runtime import resolve_numeric_path

CHROMIUM, CHROMEDRIVER = shutil.which("chromium"), shutil.which("chromedriver")
CHROME_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                "--disable-background-networking", "--disable-component-update",
                "--disable-sync", "--window-size=1100,900"]


def _ci() -> bool:
    return os.environ.get("CI", "").lower() in ("1", "true", "yes")


@pytest.fixture(scope="module")
def trained(served_run):
    return load_trained(served_run, device="cpu")


def _png_bytes(x01: torch.Tensor, size: int) -> bytes:
    """(C, H, W) in [0, 1] -> PNG bytes, resized to size x size (the lens resizes back)."""
    im = Image.fromarray((x01.permute(1, 2, 0) * 255).round().byte().numpy())
    buf = io.BytesIO()
    im.resize((size, size), Image.Resampling.NEAREST).save(buf, format="PNG")
    return buf.getvalue()


def test_attack_saves_its_strongest_decoder(served_run, trained):
    from splitcem.attacks import AttackTarget
    from splitcem.attacks.base import iterate_images

    path = served_run / ATTACK_DECODER
    meta = json.loads(path.with_suffix(".json").read_text())
    assert meta["class"] == "ResDecoder" and meta["attack"] == "decoder"
    assert meta["kwargs"] == {"in_channels": 8, "in_size": 8, "out_channels": 3,
                              "out_size": 32, "width": 16, "depth": 1}
    rec = json.loads((served_run / "metrics.json").read_text())
    recorded = rec["attacks"]["attacks"]["decoder"]["metrics"]
    assert rec["attacks"]["saved_decoder"] == {"attack": "decoder", "file": ATTACK_DECODER}
    assert meta["metrics"] == recorded
    dec, _ = load_decoder(path)
    assert isinstance(dec, ResDecoder) and not dec.training
    # it is the trained decoder: on the attack's own victim features (same seed) it scores
    # exactly what the attack recorded
    target = AttackTarget(trained.model.client, trained.stack, trained.splits.train.info, "cpu")
    with torch.random.fork_rng():
        torch.manual_seed(0)  # the attack's seed
        (x, x01), = iterate_images(trained.splits.eval, batch_size=256,
                                   device=torch.device("cpu"))
        z = target.observe(x)
    # the numeric path the attack itself decoded with (auto: bf16 where native)
    numerics = resolve_numeric_path("auto", "auto", torch.device("cpu"), what="attack")
    got = image_metrics(decode(dec, z, numerics=numerics).clamp(0, 1), x01)
    assert got["mse"] == pytest.approx(recorded["mse"], rel=1e-5)
    assert got["ssim"] == pytest.approx(recorded["ssim"], rel=1e-4)


def test_attack_without_a_decoder_removes_a_stale_one(served_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(served_run, run, ignore=shutil.ignore_patterns("deploy"))
    rec = attack_run(run, attacks=[{"name": "mean_image"}], progress=False)
    assert "saved_decoder" not in rec["attacks"]
    assert not (run / ATTACK_DECODER).exists()
    assert not (run / ATTACK_DECODER).with_suffix(".json").exists()


def test_lens_shows_exactly_what_was_sent_and_rebuilt(serving, trained):
    from splitcem.lens import Lens

    lens = Lens(serving.run, serving.url, token=serving.token)
    info = lens.info()
    assert info["attack"]["attack"] == "decoder" and info["defense"] == "noise(sigma=0.1)"
    assert info["warning"] == ""
    x01 = torch.from_numpy(trained.splits.test.images[3]).permute(2, 0, 1).float() / 255
    data = _png_bytes(x01, 32)
    torch.manual_seed(7)
    out = lens.analyze(data)
    # redo the lens's steps with the same noise draw
    torch.manual_seed(7)
    x = lens.client.load_images([data])
    z = lens.client.encode(x)
    assert torch.equal(x[0], x01)  # PNG round trip at the model's size is lossless
    want = image_metrics(decode(lens.decoder, z).clamp(0, 1), x)
    assert out["metrics"] == pytest.approx(want, rel=1e-6)
    assert out["prediction"]["label"] == lens.client.infer_features(z).labels[0].item()
    assert out["prediction"]["class"] in info["classes"]
    assert out["bytes"] == {"features_sent": 24 + 512 * 4, "raw_image": 3072,
                            "feature_values": 512}
    for key in ("original", "features", "reconstruction"):
        png = base64.b64decode(out[key].removeprefix("data:image/png;base64,"))
        assert Image.open(io.BytesIO(png)).size[0] >= 32
    with pytest.raises(ServingError, match="cannot read it as an image"):
        lens.analyze(b"not an image at all")


def _lens_url(proc: Proc) -> str:
    m = re.search(r"open (http://127\.0\.0\.1:\d+/#token=[\w-]+)", proc.line)
    assert m, proc.line
    return m.group(1)


def _browser_or_skip() -> None:
    missing = [n for n, p in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)) if not p]
    try:
        import selenium  # noqa: F401
    except ImportError:
        missing.append("selenium (pip)")
    if missing:
        msg = (f"{', '.join(missing)} not installed (make browser: apt-get install chromium "
               "chromium-driver)")
        if _ci():
            pytest.fail(f"CI must run the browser test: {msg}")
        pytest.skip(msg)


def test_lens_page_in_headless_chromium(serving, trained, tmp_path):
    _browser_or_skip()
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait

    x01 = torch.from_numpy(trained.splits.test.images[5]).permute(2, 0, 1).float() / 255
    image = tmp_path / "upload.png"
    image.write_bytes(_png_bytes(x01, 96))  # larger than the model's input: resized
    lens = Proc(["-m", "splitcem.cli", "lens", str(serving.run), "--url", serving.url,
                 "--token-file", str(serving.token_file), "--port", "0"])
    opts = webdriver.ChromeOptions()
    opts.binary_location = CHROMIUM
    for flag in [*CHROME_FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"]:
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=opts)
    try:
        driver.set_page_load_timeout(60)
        driver.get(_lens_url(lens))  # the printed URL, with its launch token
        body = driver.find_element(By.TAG_NAME, "body")
        WebDriverWait(driver, 60).until(lambda d: body.get_attribute("data-state") == "ready")
        assert "tiny_served@" in driver.find_element(By.ID, "info").text
        driver.find_element(By.ID, "file").send_keys(str(image))
        WebDriverWait(driver, 120).until(
            lambda d: body.get_attribute("data-state") in ("done", "error"))
        assert driver.find_element(By.ID, "error").text == ""
        pred = driver.find_element(By.ID, "prediction").text
        m = re.fullmatch(r"(.+) \((\d+\.\d)%\)", pred)
        assert m and m.group(1) in trained.splits.test.info.classes, pred
        recon = driver.find_element(By.ID, "reconstruction")
        assert recon.get_attribute("src").startswith("data:image/png;base64,")
        assert driver.execute_script("return arguments[0].naturalWidth", recon) >= 32
        mse = float(driver.find_element(By.ID, "mse").text)
        ssim = float(driver.find_element(By.ID, "ssim").text)
        assert 0 < mse < 1 and -1 <= ssim <= 1
        assert "2072 (features, 512 values) vs 3072" in driver.find_element(By.ID, "bytes").text
        shot = tmp_path / "lens.png"
        assert driver.save_screenshot(str(shot))
        keep = os.environ.get("SPLITCEM_LENS_SCREENSHOT")
        if keep:
            shutil.copy(shot, keep)
        pixels = np.asarray(Image.open(shot).convert("L"), dtype=np.float32)
        assert pixels.shape[1] >= 800 and pixels.std() > 10  # a rendered page, not blank
    finally:
        driver.quit()
        lens.stop()


LENS_URL = re.compile(r"open (https?)://127\.0\.0\.1:(\d+)/#token=")


def _start_lens(run, url: str, token_file, *extra: str) -> Proc:
    return Proc(["-m", "splitcem.cli", "lens", str(run), "--url", url, "--token-file",
                 str(token_file), "--port", "0", *extra], url_re=LENS_URL)


def _ask(port: int, method: str, path: str, headers: dict[str, str], body: bytes | None = None
         ) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        conn.putrequest(method, path, skip_host=True, skip_accept_encoding=True)
        for k, v in headers.items():
            conn.putheader(k, v)
        if body is not None:
            conn.putheader("Content-Length", str(len(body)))
        conn.endheaders(body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_lens_refuses_forged_requests_without_asking_the_server(serving, trained):
    """Forged Host (DNS rebinding), foreign Origin, cross-site fetch, a text/plain or form
    upload, no or a wrong token: each a 4xx, and not one byte reaches the server."""
    proxy = RecordingProxy(serving.proc.port)
    lens = _start_lens(serving.run, proxy.url, serving.token_file)
    try:
        token = _lens_url(lens).split("#token=", 1)[1]
        host = f"127.0.0.1:{lens.port}"
        png = _png_bytes(torch.from_numpy(trained.splits.test.images[1]).permute(2, 0, 1)
                         .float() / 255, 32)
        good = {"Host": host, "X-Lens-Token": token}
        seen = len(proxy.received())  # the lens's startup: health + spec
        forged = [
            ("rebound Host", "GET", "/api/info", {**good, "Host": f"evil.example:{lens.port}"},
             None, 421),
            ("rebound Host, page", "GET", "/", {"Host": "evil.example"}, None, 421),
            ("foreign Origin", "POST", "/api/analyze",
             {**good, "Origin": "http://evil", "Content-Type": "application/octet-stream"},
             png, 403),
            ("cross-site fetch", "GET", "/api/info", {**good, "Sec-Fetch-Site": "cross-site"},
             None, 403),
            ("text/plain upload", "POST", "/api/analyze", {**good, "Content-Type": "text/plain"},
             png, 415),
            ("form upload", "POST", "/api/analyze",
             {**good, "Content-Type": "application/x-www-form-urlencoded"}, png, 415),
            ("no content type", "POST", "/api/analyze", good, png, 415),
            ("no token", "POST", "/api/analyze",
             {"Host": host, "Content-Type": "application/octet-stream"}, png, 401),
            ("no token, info", "GET", "/api/info", {"Host": host}, None, 401),
            ("wrong token", "GET", "/api/info", {**good, "X-Lens-Token": token[:-1] + "x"},
             None, 401),
            ("the issue's request", "POST", "/api/analyze",
             {"Host": "evil.example", "Origin": "http://evil", "Content-Type": "text/plain"},
             png, 421),
        ]
        for name, method, path, headers, body, want in forged:
            status, data = _ask(lens.port, method, path, headers, body)
            assert status == want, (name, status, data[:200])
        time.sleep(0.5)
        assert len(proxy.received()) == seen, "a forged request reached the server"
        # the same requests, made right, work (and do reach the server)
        status, page = _ask(lens.port, "GET", "/", {"Host": f"localhost:{lens.port}"})
        assert status == 200 and b"splitcem lens" in page
        status, data = _ask(lens.port, "GET", "/api/info", {**good, "Origin": f"http://{host}"})
        assert status == 200 and json.loads(data)["model_id"].startswith("tiny_served@")
        status, data = _ask(lens.port, "POST", "/api/analyze",
                            {**good, "Content-Type": "application/octet-stream",
                             "Sec-Fetch-Site": "same-origin"}, png)
        assert status == 200 and "prediction" in json.loads(data)
        assert proxy.received().count(b"POST /v1/infer ") == 1
    finally:
        lens.stop()
        proxy.close()


def test_lens_waits_for_a_server_still_exporting(served_run, tmp_path):
    """`serve RUN & lens RUN` in one script: the lens starts first, says it is waiting, and
    comes up once the server has exported the run and listens."""
    run = tmp_path / "run"
    shutil.copytree(served_run, run, ignore=shutil.ignore_patterns("deploy"))  # not exported
    token_file = tmp_path / "token"
    token_file.write_text("lens-wait-token\n")
    port, = free_port_block(1, "127.0.0.1")  # for the server-to-be (see tests/_ports.py)
    box: dict[str, object] = {}

    def start() -> None:
        try:
            box["lens"] = _start_lens(run, f"http://127.0.0.1:{port}", token_file,
                                      "--wait", "240")
        except Exception as e:
            box["error"] = e

    t = threading.Thread(target=start)
    t.start()
    time.sleep(3)  # the lens is polling by now
    server = start_server(run, token_file=token_file, extra=("--port", str(port)))
    try:
        t.join(timeout=240)
        assert "error" not in box, box.get("error")
        lens = box["lens"]
        assert isinstance(lens, Proc)
        try:
            log = "".join(lens.lines)
            assert f"waiting for the server at http://127.0.0.1:{port}" in log
            assert "cannot reach" not in log and "Traceback" not in log
            token = _lens_url(lens).split("#token=", 1)[1]
            status, data = _ask(lens.port, "GET", "/api/info",
                                {"Host": f"127.0.0.1:{lens.port}", "X-Lens-Token": token})
            assert status == 200, data
        finally:
            lens.stop()
    finally:
        server.stop()


def test_lens_gives_up_after_its_wait(served_run, tmp_path):
    port, = free_port_block(1, "127.0.0.1")  # nothing listens there
    token_file = tmp_path / "token"
    token_file.write_text("x\n")
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "splitcem.cli", "lens", str(served_run),
                          "--url", f"http://127.0.0.1:{port}", "--token-file", str(token_file),
                          "--port", "0", "--wait", "2"], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 2
    assert "waiting for the server" in out.stdout
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("error: cannot reach the server")
    assert re.search(r"after waiting \d+ s", last), last
