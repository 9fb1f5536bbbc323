"""The decoder attacks' cheap path: clean features encoded once, the defense applied afresh.

Oracle: with the same seed, the cached path feeds the decoder the same inputs as the
reference path that re-encodes every batch of every epoch (``encode="every_epoch"``), with
and without flips, for the query decoder and the defense-aware one. The defense-aware
decoder still gets fresh noise at every step, and early stopping learns only from auxiliary
images. Real CIFAR-10 images, a random quarter-width VGG11-BN client, tiny decoders.
"""

from __future__ import annotations

import pytest
import torch

import splitcem.attacks.decoder as decoder_mod
from splitcem.attacks import AttackTarget, create_attack
from splitcem.attacks.base import iterate_images
from splitcem.attacks.features import FeatureCache, ImageBank
from splitcem.defenses import create_defense
from splitcem.errors import ConfigError, DataError
from splitcem.models import create_split_model

SIGMA = 0.1
TINY = {"epochs": 2, "width": 8, "depth": 0, "batch_size": 32}
REAL_TRAIN = decoder_mod.train_decoder  # before any test wraps it


@pytest.fixture(scope="module")
def target(cifar_splits):
    torch.manual_seed(0)
    client = create_split_model("vgg11_bn", num_classes=10, client_width=0.25,
                                server_width=0.25).client
    return AttackTarget(client, [create_defense("noise", sigma=SIGMA)],
                        cifar_splits.train.info)


@pytest.fixture(scope="module")
def aux(cifar_splits):
    return cifar_splits.train.subset(list(range(96)))


def _training_inputs(monkeypatch, target, aux, name, **params):
    """Fit the attack with a fixed seed; the decoder inputs and targets of every
    training step, and the attack's diagnostics."""
    inputs: list[torch.Tensor] = []

    def spy(decoder, *args, **kw):
        def hook(module, args):
            if module.training:
                inputs.append(args[0].detach().clone())

        handle = decoder.register_forward_pre_hook(hook)
        try:
            return REAL_TRAIN(decoder, *args, **kw)
        finally:
            handle.remove()

    monkeypatch.setattr(decoder_mod, "train_decoder", spy)
    attack = create_attack(name, **{**TINY, **params})
    torch.manual_seed(123)
    extra = attack.fit(target, aux, progress=False)
    return inputs, extra


@pytest.mark.parametrize(("name", "params"), [
    ("decoder", {}), ("decoder", {"flip": True}),
    ("decoder_adaptive", {"draws": 2}), ("decoder_adaptive", {"draws": 2, "flip": True}),
])
def test_cached_features_are_the_reencoded_ones(monkeypatch, target, aux, name, params):
    ref, ref_extra = _training_inputs(monkeypatch, target, aux, name, encode="every_epoch",
                                      **params)
    got, extra = _training_inputs(monkeypatch, target, aux, name, encode="once", **params)
    assert ref_extra["features"]["path"].startswith("re-encoded")
    assert extra["features"]["path"].startswith("clean features encoded once")
    assert extra["features"]["fallback"] is None
    k = params.get("draws", 1)
    assert len(got) == len(ref) == TINY["epochs"] * 3  # 96 images, batches of 32
    for a, b in zip(got, ref, strict=True):
        assert a.shape == b.shape == (k * 32, *target.feature_shape)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)  # same noise, same images
    # the same inputs train the same decoder
    assert extra["train_loss"] == pytest.approx(ref_extra["train_loss"], rel=1e-4)


def test_adaptive_decoder_draws_fresh_noise_every_step(monkeypatch, target, aux):
    """Cached path: each image's clean features are fixed, its noise is new in every
    epoch and for each of the two draws, with the defense's sigma."""
    gathered: list[torch.Tensor] = []
    real_gather = FeatureCache.gather

    def gather(self, idx, mirrored=None):
        gathered.append(idx.clone())
        return real_gather(self, idx, mirrored)

    monkeypatch.setattr(FeatureCache, "gather", gather)
    inputs, _ = _training_inputs(monkeypatch, target, aux, "decoder_adaptive", draws=2,
                                 epochs=3, batch_size=len(aux))  # one step per epoch
    (x, _), = iterate_images(aux, batch_size=len(aux), device=target.device)
    clean = target.clean(x)
    assert len(inputs) == len(gathered) == 3
    noises = []
    for z, idx in zip(inputs, gathered, strict=True):
        order = torch.argsort(idx)  # back to the images' own order
        noise = (z - clean[idx].repeat(2, 1, 1, 1)).reshape(2, len(aux), -1)[:, order]
        assert float(noise.std()) == pytest.approx(SIGMA, rel=0.05)
        noises += [noise[0], noise[1]]
    for i in range(len(noises)):  # six draws per image: pairwise uncorrelated
        for j in range(i):
            corr = torch.corrcoef(torch.stack([noises[i].flatten(), noises[j].flatten()]))
            assert abs(float(corr[0, 1])) < 0.05, (i, j)


def test_feature_cache_matches_encoder_with_mirrors(target, aux):
    bank = ImageBank(aux, target.device)
    cache = FeatureCache.build(bank, target.clean, flip=True, batch_size=40)
    idx = torch.tensor([5, 0, 77, 31])
    x, _ = bank.batch(idx)
    mirrored = torch.tensor([True, False, True, False]).view(-1, 1, 1, 1)
    want = target.clean(torch.where(mirrored, x.flip(-1), x))
    torch.testing.assert_close(cache.gather(idx, mirrored), want, rtol=0, atol=1e-5)
    assert cache.nbytes == 2 * len(aux) * 8 * 8 * 8 * 4
    with pytest.raises(ValueError, match="mirror"):
        FeatureCache.build(bank, target.clean, flip=False, batch_size=40).gather(idx, mirrored)


def test_early_stop_learns_only_from_auxiliary_images(monkeypatch, target, aux, cifar_splits):
    """The held-out part of the early stop is auxiliary images not trained on, never the
    victim's; the victim's images do not change what is learnt; training stops once the
    held-out MSE stops falling, and the best epoch's weights are kept."""
    seen: dict[str, object] = {}

    def spy(decoder, target, train_aux, features, **kw):
        seen["train"], seen["stop"] = train_aux, kw["early_stop"]
        return REAL_TRAIN(decoder, target, train_aux, features, **kw)

    monkeypatch.setattr(decoder_mod, "train_decoder", spy)
    spec = {**TINY, "epochs": 6, "early_stop": 2, "val_fraction": 0.25, "lr": 1e-9,
            "lr_min": 0.0}  # lr ~ 0: the held-out MSE cannot fall, so it stops at 1 + 2
    results = []
    for held in (cifar_splits.test.subset(range(20)), cifar_splits.test.subset(range(20, 40))):
        r = create_attack("decoder", **spec).run(target, aux, held, progress=False)
        results.append(r.extra)
        stop, train = seen["stop"], seen["train"]
        val = {bytes(im) for im in (stop.x01 * 255).round().byte().permute(0, 2, 3, 1).numpy()}
        assert len(val) == 24 and len(train) == 72
        assert val <= {bytes(im) for im in aux.images}  # auxiliary images ...
        assert not val & {bytes(im) for im in train.images}  # ... not trained on ...
        assert not val & {bytes(im) for im in held.images}  # ... and never the victim's
    a, b = results
    assert a["early_stop"] == b["early_stop"] and a["train_loss"] == b["train_loss"]
    assert a["epochs_run"] == 3 and a["early_stop"]["best_epoch"] == 1
    assert len(a["early_stop"]["val_loss"]) == 3


def test_early_stop_keeps_the_best_epoch(target, aux, cifar_splits):
    """With a real learning rate the held-out loss falls; the kept weights are the best
    epoch's (its held-out MSE is the minimum of the curve)."""
    a = create_attack("decoder", **{**TINY, "epochs": 4, "early_stop": 1, "lr": 1e-2})
    r = a.run(target, aux, cifar_splits.test.subset(range(20)), progress=False)
    es = r.extra["early_stop"]
    assert es["val_loss"][es["best_epoch"] - 1] == min(es["val_loss"])
    assert es["val_loss"][-1] < es["val_loss"][0]  # it learnt


def test_encode_and_early_stop_errors(target, aux, cifar_splits):
    with pytest.raises(ConfigError, match="encode"):
        create_attack("decoder", encode="sometimes")
    with pytest.raises(ConfigError, match="val_fraction"):
        create_attack("decoder", val_fraction=1.0)
    tiny = cifar_splits.train.subset([0])
    with pytest.raises(DataError, match="leaves none"):
        create_attack("decoder", **TINY, early_stop=1, val_fraction=0.5).run(
            target, tiny, cifar_splits.test.subset(range(4)), progress=False)
