"""splitcem.audit: the attack suite on a user's own client and images."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

import splitcem
from splitcem.attacks import as_dataset
from splitcem.errors import ConfigError, DataError
from splitcem.experiment import load_trained


def test_audit_reproduces_splitcem_attack_on_a_yaml_run(tiny_config, tmp_path):
    """Same client, same images, same seeds: audit's report is the one `splitcem attack`
    wrote into the run's metrics.json."""
    cfg = tiny_config(defenses=[{"name": "noise", "sigma": 0.1}], cem={"lambda": 0.5})
    record = splitcem.run_experiment(cfg, tmp_path / "run", progress=False)
    p = load_trained(tmp_path / "run")
    info = p.splits.test.info
    x01 = torch.from_numpy(p.splits.test.images).permute(0, 3, 1, 2).float() / 255
    y = torch.from_numpy(p.splits.test.labels)
    client = splitcem.protect(p.model.client, p.stack, num_classes=info.num_classes)
    with pytest.warns(UserWarning, match=r"rests on 13 scored images \(< 100\)"):
        rep = splitcem.audit(client, (x01, y), attacks=cfg.attack.attacks, mean=info.mean,
                             std=info.std, seed=cfg.data.split_seed, out=tmp_path / "audit",
                             progress=False)
    worst = rep.to_dict()["worst"]
    mse = worst["mse"]
    assert mse.pop("images") == 13  # 10% of the 128 test images are scored
    lo, hi = mse.pop("ci95")
    assert lo < mse["value"] < hi
    # the re-scoring behind the interval repeats the attack's own scoring
    assert rep.results["decoder"].extra["mse_rescored"] == pytest.approx(mse["value"],
                                                                     rel=1e-3)
    assert worst == record["attacks"]["worst"]
    assert rep.to_dict()["attacks"]["decoder"]["metrics"] == \
        record["attacks"]["attacks"]["decoder"]["metrics"]
    written = json.loads((tmp_path / "audit" / "metrics.json").read_text())
    # same record layout; a YAML run's attack record also carries its provenance for the run
    # record (the config hashes and the held-out split it was attacked on)
    provenance = {"train_hash", "attack_hash", "split"}
    assert set(written["attacks"]) == set(record["attacks"]) - provenance
    assert (tmp_path / "audit" / "reconstructions.png").stat().st_size > 1000
    summary = (tmp_path / "audit" / "summary.md").read_text()
    assert "worst case" in summary and "on 13 scored images, 95% interval" in summary
    from splitcem.attacks.decoder import load_decoder

    _dec, meta = load_decoder(tmp_path / "audit" / "attack_decoder.safetensors")
    assert meta["attack"] == "decoder" and meta["metrics"]["mse"] == mse["value"]


def _toy(n: int = 40, size: int = 12) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, size, size, generator=g), torch.randint(0, 4, (n,), generator=g)


def test_images_round_trip_and_bad_inputs_are_explained():
    x, y = _toy()
    ds = as_dataset((x, y), mean=(0.5,) * 3, std=(0.2,) * 3)
    assert ds.images.shape == (40, 12, 12, 3) and ds.info.num_classes == 4
    back = torch.from_numpy(ds.images).permute(0, 3, 1, 2).float() / 255
    assert (back - x).abs().max() <= 0.5 / 255 + 1e-6  # uint8 storage, as every dataset
    pairs = [(x[i], int(y[i])) for i in range(len(y))]  # a map-style dataset
    assert (as_dataset(pairs).images == ds.images).all()
    with pytest.raises(DataError, match=r"\[0, 1\] before normalisation"):
        as_dataset(((x - 0.5) / 0.2, y))
    with pytest.raises(DataError, match=r"square.*center-crop or resize"):
        as_dataset(torch.rand(2, 3, 8, 10))
    for bad in (float("nan"), float("inf")):
        xb = x.clone()
        xb[3, 0, 1, 1] = bad
        with pytest.raises(DataError, match="1 of 40 images hold NaN or inf"):
            as_dataset((xb, y))
    with pytest.raises(DataError, match=r"in \[0, 1\] before normalisation, found \[.*, 1.5\]"):
        as_dataset((x * 1.5 / x.max(), y))


def test_a_forgotten_normalisation_is_one_line():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid())
    x, y = _toy()
    client = splitcem.protect(enc, ["noise"])
    client((x - 0.5) / 0.2)  # trained on normalised inputs, but protect got no mean/std
    with pytest.raises(ConfigError, match=r"normalised\?\) but neither protect nor audit"):
        splitcem.audit(client, (x, y), attacks=["mean_image"], progress=False)
    rep = splitcem.audit(client, (x, y), attacks=["mean_image"], mean=(0.5,) * 3,
                         std=(0.2,) * 3, progress=False)
    assert rep.worst["mse"]["images"] == 4


def test_plain_encoder_and_threat_models():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid())
    x, y = _toy()
    rep = splitcem.audit(enc, (x, y), attacks=["mean_image"], progress=False)
    assert set(rep.worst) == {"mse", "ssim", "psnr"} and rep.results["mean_image"].metrics
    assert len(rep.results["mean_image"].originals) == 4  # the 10% held out of 40 images
    with pytest.raises(ConfigError, match="train="):
        splitcem.audit(enc, (x, y), attacks=["mean_image"], threat="training")
    both = splitcem.audit(enc, (x, y), attacks=["mean_image"], train=_toy(20),
                          threat=["inference", "training"], progress=False)
    assert set(both.results) == {"mean_image@inference/whitebox",
                                 "mean_image@training/whitebox"}
