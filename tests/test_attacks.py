"""Model inversion attacks on real CIFAR-10 images at tiny size.

The target is a randomly initialised VGG11-BN client at width 0.25 (random conv encoders are
quite invertible); the attacker uses the training-time threat model (learns from the 512
training images, scored on 64 test images). Sizes are chosen so the file runs in well under a
minute on one core.
"""

from __future__ import annotations

import itertools
import json
import math

import pytest
import torch

import splitcem.attacks as attacks_pkg
from splitcem.attacks import (
    ACCESS_LEVELS,
    AttackResult,
    AttackTarget,
    ResDecoder,
    ThreatModel,
    all_attack_specs,
    create_attack,
    list_attacks,
    run_attacks,
    worst_case,
)
from splitcem.attacks.base import iterate_images
from splitcem.attacks.suite import parse_specs
from splitcem.defenses import DefenseStack, create_defense
from splitcem.errors import ConfigError, DataError, UnknownNameError
from splitcem.models import create_split_model

# tiny decoder settings shared by the decoder-based attacks
DEC = {"epochs": 3, "width": 16, "depth": 1, "batch_size": 32}
THREAT = ThreatModel(setting="training", access="whitebox", heldout_limit=64)


@pytest.fixture(scope="module")
def client():
    torch.manual_seed(0)
    return create_split_model("vgg11_bn", num_classes=10, client_width=0.25,
                              server_width=0.25).client


@pytest.fixture(scope="module")
def target(client, cifar_splits):
    return AttackTarget(client, None, cifar_splits.train.info)


@pytest.fixture(scope="module")
def report(target, cifar_splits):
    """One suite run shared by the tests below (the expensive part of this file)."""
    specs = [
        {"name": "mean_image"},
        {"name": "decoder", **DEC},
        {"name": "rmle", "init": "mean", "steps": 100, "lr": 0.1, "tv_weight": 0.05,
         "batch_size": 64},
        {"name": "gan", "init_from": "decoder", "epochs": 2, "n_critic": 2,
         "critic_width": 16, "batch_size": 32},
    ]
    return run_attacks(target, cifar_splits, specs, threat=THREAT, progress=False)


# ---- every attack beats the trivial baseline on an undefended encoder ----------------------


@pytest.mark.slow
@pytest.mark.parametrize("label", ["decoder", "rmle", "gan"])
def test_attack_beats_mean_image(report, label):
    base = report.results["mean_image"].metrics
    got = report.results[label].metrics
    assert got["mse"] < 0.9 * base["mse"], (label, got, base)
    assert got["ssim"] > base["ssim"] and got["psnr"] > base["psnr"]


@pytest.mark.slow
def test_adaptive_decoder_beats_mean_image_under_noise(client, cifar_splits, monkeypatch):
    """The defense-aware decoder against the noise defense, with two draws per image: it
    trains on the defense's noisy features (fresh draws), not on the clean ones. On the
    reference path (``encode="every_epoch"``), which calls the features per batch;
    tests/test_attack_features.py checks the cached path against it."""
    import splitcem.attacks.decoder as decoder_mod

    t = AttackTarget(client, [create_defense("noise", sigma=0.1)], cifar_splits.train.info)
    aux, held = THREAT.select(cifar_splits)
    base = create_attack("mean_image").run(t, aux, held, progress=False).metrics
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []  # (input batch, its training features)
    real = decoder_mod.train_decoder

    def spy(decoder, target, aux, features, **kw):
        def recording(x):
            z = features(x)
            if len(seen) < 2:
                seen.append((x.clone(), z.clone()))
            return z

        return real(decoder, target, aux, recording, **kw)

    monkeypatch.setattr(decoder_mod, "train_decoder", spy)
    a = create_attack("decoder_adaptive", draws=2, encode="every_epoch", **DEC)
    got = a.run(t, aux, held, progress=False).metrics
    assert got["mse"] < 0.9 * base["mse"] and got["ssim"] > base["ssim"]
    assert seen, "the adaptive decoder never asked for training features"
    for x, z in seen:
        b = x.shape[0]
        assert z.shape == (2 * b, *t.feature_shape)  # two draws per image
        clean = t.clean(x).repeat(2, 1, 1, 1)
        noise = z - clean
        assert float(noise.std()) == pytest.approx(0.1, rel=0.05)  # the defense's noise
        assert abs(float(noise.mean())) < 0.01
        assert not torch.equal(z[:b], z[b:])  # fresh draws, not one repeated


def test_target_match_reproduces_deterministic_defenses(client, cifar_splits):
    """What rMLE compares with the observation: top-k of the candidate's features (exactly
    what was sent), clipping under LDP (up to its zero-mean noise); not f(x) itself."""
    x = next(iterate_images(cifar_splits.test, batch_size=8, device=torch.device("cpu")))[0]
    t = AttackTarget(client, [create_defense("topk", ratio=0.3)], cifar_splits.train.info)
    observed = t.observe(x)
    z = t.clean(x).requires_grad_(True)
    m = t.match(z, observed)
    assert torch.equal(m.detach(), observed) and not torch.equal(t.clean(x), observed)
    m.sum().backward()  # differentiable: the gradient reaches the kept features
    assert z.grad is not None and 0 < int((z.grad != 0).sum()) < z.numel()
    ldp = AttackTarget(client, [create_defense("ldp", clip=2.0)], cifar_splits.train.info)
    clipped = ldp.match(ldp.clean(x), ldp.observe(x))
    assert torch.allclose(clipped.flatten(1).norm(dim=1), torch.full((8,), 2.0))


@pytest.mark.slow
def test_rmle_matches_the_defense_transform(client, cifar_splits, monkeypatch):
    """Against top-k, rMLE that matches topk(f(x)) to what was sent is much stronger than
    rMLE that matches f(x) (what it did before it applied the defense's transforms)."""
    t = AttackTarget(client, [create_defense("topk", ratio=0.3)], cifar_splits.train.info)
    aux, held = cifar_splits.train.subset(range(64)), cifar_splits.test.subset(range(16))
    spec = {"init": "mean", "steps": 60, "lr": 0.1, "batch_size": 16}
    matched = create_attack("rmle", **spec).run(t, aux, held, progress=False).metrics
    monkeypatch.setattr(AttackTarget, "match", lambda self, z, observed: z)  # f(x) alone
    plain = create_attack("rmle", **spec).run(t, aux, held, progress=False).metrics
    assert matched["mse"] < 0.8 * plain["mse"], (matched, plain)


@pytest.mark.slow
def test_rmle_feature_loss_decreases_monotonically(report):
    curve = report.results["rmle"].extra["feature_loss_curve"]
    assert len(curve) >= 20
    first = curve[:20]
    assert all(b < a for a, b in itertools.pairwise(first)), first
    assert first[-1] < 0.5 * first[0]


@pytest.mark.slow
def test_gan_losses_finite_and_no_divergence(report):
    ex = report.results["gan"].extra
    for k in ("critic_loss", "generator_loss", "wasserstein", "gen_mse"):
        assert ex[k] and all(math.isfinite(v) for v in ex[k]), (k, ex[k])
    assert ex["generator_steps"] >= 2
    # fine-tuning from the decoder must not wreck the reconstruction
    assert report.results["gan"].metrics["mse"] < 1.5 * report.results["decoder"].metrics["mse"]


@pytest.mark.slow
def test_worst_case_picks_best_per_metric(report):
    for metric, pick in report.worst.items():
        vals = {k: r.metrics[metric] for k, r in report.results.items()}
        best = min(vals.values()) if metric == "mse" else max(vals.values())
        assert pick["value"] == best and vals[pick["attack"]] == best
    d = json.loads(json.dumps(report.to_dict()))
    assert set(d) == {"threat", "threats", "attacks", "skipped", "worst"}
    assert "| **worst case** |" in report.table()


def test_worst_case_mixes_attacks():
    e = torch.zeros(0)
    rs = {
        "a": AttackResult("a", {"mse": 0.02, "ssim": 0.4, "psnr": 18.0}, e, e, 1.0),
        "b": AttackResult("b", {"mse": 0.03, "ssim": 0.5, "psnr": 17.0}, e, e, 1.0),
        "c": AttackResult("c", {"mse": 0.02, "ssim": 0.1, "psnr": 19.0}, e, e, 1.0),
    }
    w = worst_case(rs)
    assert {k: v["attack"] for k, v in w.items()} == {"mse": "a", "ssim": "b", "psnr": "c"}
    assert worst_case({}) == {}


def test_inapplicable_attack_skipped_with_reason(target, cifar_splits):
    threat = ThreatModel(setting="training", access="query", heldout_limit=16, aux_limit=64)
    specs = [{"name": "mean_image"}, {"name": "rmle", "steps": 1, "init": "mean"},
             {"name": "decoder_adaptive", "epochs": 1, "width": 8, "depth": 0}]
    rep = run_attacks(target, cifar_splits, specs, threat=threat, progress=False)
    assert list(rep.results) == ["mean_image"]
    assert set(rep.skipped) == {"rmle", "decoder_adaptive"}
    assert all("whitebox" in why and "query" in why for why in rep.skipped.values())
    assert rep.worst["mse"]["attack"] == "mean_image"


def test_worst_case_across_threat_models(target, cifar_splits):
    """Two threat models: every attack runs under each, labels say which, the worst case is
    taken over all results, and the figure gets one originals row per threat model."""
    threats = [
        ThreatModel(setting="inference", heldout_limit=16, aux_limit=64),
        {"setting": "training", "access": "query", "heldout_limit": 24, "aux_limit": 256},
    ]
    specs = [{"name": "mean_image"}, {"name": "decoder", "epochs": 2, "width": 8, "depth": 0},
             {"name": "rmle", "steps": 1, "init": "mean"}]
    rep = run_attacks(target, cifar_splits, specs, threat=threats, progress=False)
    assert list(rep.results) == [
        "mean_image@inference/whitebox", "decoder@inference/whitebox",
        "rmle@inference/whitebox", "mean_image@training/query", "decoder@training/query"]
    assert list(rep.skipped) == ["rmle@training/query"]  # query access: no white-box attack
    assert rep.results["decoder@training/query"].extra["heldout_images"] == 24
    assert rep.results["decoder@inference/whitebox"].extra["aux_images"] == 64
    for metric, pick in rep.worst.items():
        vals = [r.metrics[metric] for r in rep.results.values()]
        assert pick["value"] == (min(vals) if metric == "mse" else max(vals))
    d = json.loads(json.dumps(rep.to_dict()))
    assert [t["setting"] for t in d["threats"]] == ["inference", "training"]
    assert d["attacks"]["decoder@training/query"]["threat"] == "training/query"


def test_decoder_flip_augmentation_encodes_mirrored_images(target, cifar_splits):
    """flip=True: the attacker queries mirrored copies of about half its images, and the
    targets are mirrored with them (else the decoder would learn to un-mirror)."""
    from splitcem.attacks.decoder import train_decoder

    aux = cifar_splits.train.subset(list(range(64)))
    seen: list[torch.Tensor] = []

    def features(x):
        seen.append(x.clone())
        return target.clean(x)

    dec = ResDecoder.for_target(target, width=8, depth=0)
    torch.manual_seed(0)
    train_decoder(dec, target, aux, features, epochs=2, batch_size=64, lr=1e-3,
                  weight_decay=0.0, flip=True, progress=False)
    (x, _), = list(iterate_images(aux, batch_size=64, device=target.device))
    for batch in seen:  # every image is either itself or its mirror, and both kinds occur
        d_same = (batch[:, None] - x[None]).flatten(2).abs().amax(2).amin(1)
        d_flip = (batch[:, None] - x.flip(-1)[None]).flatten(2).abs().amax(2).amin(1)
        assert bool((torch.minimum(d_same, d_flip) < 1e-6).all())
        n_flip = int((d_flip < 1e-6).sum())
        assert 10 < n_flip < 54, n_flip


def test_init_from_follows_the_declared_attribute(monkeypatch):
    """Which attacks may start from another's decoder is a declared class attribute, not a
    list of names: a new attack that declares it is started from ``decoder`` by --all."""
    from splitcem.attacks import ATTACKS, MeanImageAttack

    class FromDecoder(MeanImageAttack):
        """A test attack that takes a decoder."""

        starts_from_decoder = True

    monkeypatch.setitem(ATTACKS._entries, "zz_from_decoder", FromDecoder)
    specs = {s["name"]: s for s in all_attack_specs()}
    assert specs["zz_from_decoder"]["init_from"] == "decoder"
    assert {n for n, s in specs.items() if "init_from" in s} == {
        n for n in list_attacks() if create_attack(n).starts_from_decoder}
    parse_specs([{"name": "decoder"}, {"name": "zz_from_decoder", "init_from": "decoder"}])


def test_adaptive_decoder_continues_the_plain_decoder(client, cifar_splits):
    """``decoder_adaptive`` with ``init_from: decoder`` continues the plain decoder's
    training (the protocol's shared attack work): its first epoch starts near where the
    decoder ended, far below a fresh decoder's first epoch; the source is not changed; the
    record says where it started; another width is one clear error."""
    t = AttackTarget(client, [create_defense("noise", sigma=0.1)], cifar_splits.train.info)
    spec = {"width": 16, "depth": 1, "batch_size": 32}
    rep = run_attacks(t, cifar_splits, [
        {"name": "decoder", "epochs": 4, **spec},
        {"name": "decoder_adaptive", "draws": 2, "epochs": 1, "init_from": "decoder", **spec},
        {"name": "decoder_adaptive", "label": "fresh", "draws": 2, "epochs": 1, **spec},
    ], threat=THREAT, progress=False)
    dec, warm, fresh = (rep.results[k].extra for k in ("decoder", "decoder_adaptive", "fresh"))
    assert warm["init_from"] == "decoder" and "init_from" not in fresh
    assert warm["started_from"].startswith("another attack's")
    assert fresh["started_from"] == "random weights"
    assert warm["train_loss"][0] < 0.75 * fresh["train_loss"][0], (warm, fresh)
    assert warm["train_loss"][0] < 1.25 * dec["train_loss"][-1], (warm, dec)
    # the plain decoder's own result and weights are its own (the suite hands over a copy)
    assert not all(torch.equal(a, b) for a, b in zip(
        rep.decoders["decoder"].state_dict().values(),
        rep.decoders["decoder_adaptive"].state_dict().values(), strict=True))
    with pytest.raises(ConfigError, match="same width and depth"):
        run_attacks(t, cifar_splits, [
            {"name": "decoder", "epochs": 1, **spec},
            {"name": "decoder_adaptive", "epochs": 1, "init_from": "decoder",
             **{**spec, "width": 8}}], threat=THREAT, progress=False)


def test_figure_images_spread_over_heldout_set():
    from splitcem.attacks.base import NUM_KEPT, kept_indices

    idx = kept_indices(1000)
    assert len(idx) == NUM_KEPT and idx[0] == 0 and idx[-1] == 999
    assert bool((idx.diff() > 50).all())  # spread, not the first 16 (often one class)
    assert kept_indices(5).tolist() == [0, 1, 2, 3, 4]


# ---- registry contract: every registered attack, tiny, on real images ---------------------

TINY = {
    "mean_image": {},
    "decoder": {"epochs": 1, "width": 8, "depth": 0, "batch_size": 32},
    "decoder_strong": {"epochs": 1, "width": 8, "depth": 0, "batch_size": 32},
    "decoder_adaptive": {"epochs": 1, "width": 8, "depth": 0, "batch_size": 32, "draws": 2},
    "rmle": {"steps": 3, "init": "mean", "batch_size": 16},
    "gan": {"pretrain_epochs": 1, "epochs": 1, "n_critic": 1, "width": 8, "depth": 0,
            "critic_width": 8, "batch_size": 32},
}


def test_every_registered_attack_has_a_tiny_config():
    assert set(TINY) == set(list_attacks())


@pytest.mark.parametrize("name", list_attacks())
def test_attack_contract(name, cifar_splits, client):
    t = AttackTarget(client, [create_defense("noise", sigma=0.05)], cifar_splits.train.info)
    aux, held = cifar_splits.train.subset(range(64)), cifar_splits.test.subset(range(20))
    a = create_attack(name, **TINY[name])
    assert a.name == name and a.requires in ACCESS_LEVELS
    r = a.run(t, aux, held, progress=False)
    assert r.name == name
    assert r.originals.shape == r.reconstructions.shape == (16, 3, 32, 32)
    assert r.reconstructions.device.type == "cpu"
    assert r.reconstructions.min() >= 0 and r.reconstructions.max() <= 1
    assert set(r.metrics) == {"mse", "ssim", "psnr"}
    assert all(math.isfinite(v) for v in r.metrics.values()) and r.seconds > 0
    json.dumps(r.to_dict())
    # same seed -> same result; the caller's RNG state is untouched
    state = torch.get_rng_state()
    again = create_attack(name, **TINY[name]).run(t, aux, held, progress=False)
    assert torch.equal(torch.get_rng_state(), state)
    for k, v in r.metrics.items():
        assert again.metrics[k] == pytest.approx(v, rel=1e-5, abs=1e-7), (k, name)


def test_same_victim_features_for_every_attack(cifar_splits, client):
    """Attacks with the same seed score against the same noisy victim features."""
    t = AttackTarget(client, [create_defense("noise", sigma=0.1)], cifar_splits.train.info)
    held = cifar_splits.test.subset(range(8))
    seen = []

    class Spy(attacks_pkg.MeanImageAttack):
        def reconstruct(self, target, z):
            seen.append(z.clone())
            return super().reconstruct(target, z)

    for _ in range(2):
        Spy().run(t, cifar_splits.train.subset(range(8)), held, progress=False)
    assert torch.equal(seen[0], seen[1])


# ---- specs, threat models, target -------------------------------------------------------


def test_spec_errors():
    with pytest.raises(UnknownNameError, match=r"known: .*decoder"):
        parse_specs([{"name": "nope"}])
    with pytest.raises(ConfigError, match=r"no parameter.*'epoch'.*accepted"):
        parse_specs([{"name": "decoder", "epoch": 3}])
    with pytest.raises(ConfigError, match="'name' key"):
        parse_specs([{"epochs": 3}])
    with pytest.raises(ConfigError, match="used twice"):
        parse_specs([{"name": "decoder"}, {"name": "decoder"}])
    with pytest.raises(ConfigError, match="earlier attack"):
        parse_specs([{"name": "gan", "init_from": "decoder"}])
    with pytest.raises(ConfigError, match="cannot start from"):
        parse_specs([{"name": "decoder"}, {"name": "mean_image", "init_from": "decoder"}])
    with pytest.raises(ConfigError, match="list"):
        parse_specs({"name": "decoder"})
    with pytest.raises(ConfigError, match="epochs"):
        create_attack("decoder", epochs=0)
    with pytest.raises(ConfigError, match="init"):
        create_attack("rmle", init="zeros")
    labels = [lab for lab, _, _ in parse_specs(
        [{"name": "decoder"}, {"name": "decoder", "label": "decoder_wide", "width": 128}])]
    assert labels == ["decoder", "decoder_wide"]
    specs = all_attack_specs()
    assert {s["name"] for s in specs} == set(list_attacks())
    assert [lab for lab, _, _ in parse_specs(specs)]  # the --all list is valid


def test_threat_model(cifar_splits):
    aux, held = ThreatModel().select(cifar_splits)
    assert (len(aux), len(held)) == (len(cifar_splits.aux), len(cifar_splits.eval))
    aux, held = ThreatModel(setting="training", aux_limit=100).select(cifar_splits)
    assert (len(aux), len(held)) == (100, len(cifar_splits.test))
    assert ThreatModel(access="query").allows("whitebox") is not None
    assert ThreatModel(access="query").allows("outputs") is None
    assert ThreatModel.from_dict({"setting": "training"}).setting == "training"
    with pytest.raises(ConfigError, match="access"):
        ThreatModel(access="root")
    with pytest.raises(ConfigError, match="no key"):
        ThreatModel.from_dict({"acess": "query"})
    with pytest.raises(ConfigError, match="heldout_limit"):
        ThreatModel(heldout_limit=0)


def test_target_observe_restores_modes_and_applies_defense(client, cifar_splits):
    stack = DefenseStack([create_defense("noise", sigma=0.1)])
    t = AttackTarget(client, stack, cifar_splits.train.info)
    client.train()
    x = torch.randn(4, 3, 32, 32)
    z1, z2 = t.observe(x), t.observe(x)
    assert client.training and stack.training  # restored
    assert all(m.training for m in client.modules())
    assert z1.shape == (4, *t.feature_shape) == (4, 8, 8, 8) and not z1.requires_grad
    assert not torch.equal(z1, z2)  # fresh noise per query
    assert torch.equal(t.clean(x), t.clean(x))  # eval mode: deterministic
    assert t.noise_sigma == pytest.approx(0.1)
    with t.frozen() as c:
        assert not c.training and not any(p.requires_grad for p in c.parameters())
    assert all(p.requires_grad for p in client.parameters()) and client.training
    client.eval()


def test_empty_sets_raise(target, cifar_splits):
    empty = cifar_splits.test.subset([])
    with pytest.raises(DataError, match="held-out"):
        create_attack("mean_image").run(target, cifar_splits.train, empty, progress=False)
    with pytest.raises(DataError, match="auxiliary"):
        create_attack("mean_image").run(target, empty, cifar_splits.test, progress=False)


@pytest.mark.parametrize(("cz", "s", "c", "size"), [(8, 8, 3, 32), (8, 7, 1, 28), (4, 7, 3, 32),
                                                    (8, 16, 3, 64), (8, 4, 3, 32), (8, 12, 3, 48)])
def test_res_decoder_shapes_and_grads(cz, s, c, size):
    dec = ResDecoder(cz, s, c, size, width=8, depth=2)
    out = dec(torch.randn(2, cz, s, s))
    assert out.shape == (2, c, size, size) and out.min() >= 0 and out.max() <= 1
    out.mean().backward()
    assert all(p.grad is not None for p in dec.parameters())


def test_res_decoder_paper_layout():
    """res_normN8C64 for 8x8x8 -> 32x32x3: 1 + 8 + 1 blocks and two transposed convs."""
    dec = ResDecoder(8, 8, 3, 32)
    assert sum(isinstance(m, torch.nn.ConvTranspose2d) for m in dec.modules()) == 2
    assert sum(type(m).__name__ == "ResBlock" for m in dec.modules()) == 10
    assert not dec.resize
    with pytest.raises(ConfigError, match="depth"):
        ResDecoder(8, 8, 3, 32, depth=-1)


def test_public_surface():
    ns: dict = {}
    exec("from splitcem.attacks import *", ns)
    assert all(n in ns for n in attacks_pkg.__all__)
