"""The privacy lens: the attack stage saves its strongest decoder, the lens back end shows
exactly what the server got and what that decoder rebuilds from it, and the page works in
a real headless browser (Debian's chromium + chromedriver, driven by selenium)."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import shutil
import tempfile

import numpy as np
import pytest
import torch
from _serving_utils import Proc
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
