"""splitcem.protect: the user's loop with a protected client trains what the Trainer trains."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import splitcem
from splitcem.config import TrainConfig
from splitcem.data import ArrayDataset, BatchLoader, DatasetInfo, DataSplits
from splitcem.defenses import Protected, make_stack
from splitcem.defenses.cem import CEM
from splitcem.errors import ConfigError, ProtectError
from splitcem.train import Trainer

NOISE_CEM = {"defenses": [{"name": "noise", "sigma": 0.1}], "cem": {"lambda": 1.0, "clusters": 2}}


def toy_splits(n: int = 96, classes: int = 3, size: int = 8, seed: int = 0) -> DataSplits:
    """Random images whose brightness depends on the class (something to learn)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, classes, n).astype(np.int64)
    base = (labels * (200 // classes))[:, None, None, None]
    images = np.clip(base + rng.integers(0, 60, (n, size, size, 3)), 0, 255).astype(np.uint8)
    info = DatasetInfo("toy", classes, 3, size, (0.5,) * 3, (0.25,) * 3,
                       tuple(map(str, range(classes))))
    ds = ArrayDataset(images, labels, info)
    return DataSplits(train=ds, aux=ds.subset(range(60)), eval=ds.subset(range(60, 96)), test=ds)


def tiny_model(classes: int = 3, size: int = 8):
    return splitcem.create_split_model("vgg11_bn", num_classes=classes, image_size=size, cut=2,
                                       client_width=0.125, server_width=0.125)


def test_own_loop_matches_the_trainer_bit_for_bit():
    """The oracle: protect drives the same stack hooks as splitcem.train.Trainer, so an SGD
    loop over the Trainer's batches gives the same weights and the same CEM mixture."""
    splits = toy_splits()
    # float32 and the default layout, as the plain loop below (auto would pick bf16 on a CPU
    # that has it natively)
    cfg = TrainConfig(epochs=3, batch_size=16, lr=0.05, milestones=[], eval_every=3,
                      amp=False, channels_last=False)
    torch.manual_seed(0)
    ref = tiny_model()
    ref_stack = make_stack(NOISE_CEM["defenses"], NOISE_CEM["cem"])
    torch.manual_seed(1)
    Trainer(ref, ref_stack, splits, cfg, device=torch.device("cpu"), seed=0, progress=False,
            augment=False).fit()

    torch.manual_seed(0)
    model = tiny_model()
    client = splitcem.protect(model.client, NOISE_CEM["defenses"], cem=NOISE_CEM["cem"],
                              num_classes=3)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    loader = BatchLoader(splits.train, batch_size=16, shuffle=True, augment=False,
                         device="cpu", seed=0, drop_last=True)
    torch.manual_seed(1)
    terms_seen = set()
    for epoch in range(3):
        model.train()
        client.train()
        loader.set_epoch(epoch)
        for x, y in loader:
            loss = F.cross_entropy(model.server(client(x)), y) + client.loss(y)
            terms_seen |= set(client.last_terms)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        client.epoch_end()
    assert "cem" in terms_seen  # CEM was active (epochs 2 and 3)
    for (name, a), b in zip(ref.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    cem_ref, cem = ref_stack.defenses[-1], client.defenses.defenses[-1]
    assert torch.equal(cem_ref.var, cem.var) and torch.equal(cem_ref.centroids, cem.centroids)
    assert (client.epoch, client.step) == (3, 3 * len(loader))


def test_forward_is_the_deployed_transform_in_both_modes():
    torch.manual_seed(0)
    enc = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Sigmoid())
    p = splitcem.protect(enc, ["noise"])
    x = torch.randn(5, 3, 6, 6)
    for mode in (True, False):
        p.train(mode)
        assert p.defenses.training is mode
        with torch.no_grad():
            z, clean = p(x), enc(x)
        assert z.shape == clean.shape and not torch.equal(z, clean)
        assert 0.05 < float((z - clean).std()) < 0.2  # sigma 0.1, the default
    assert list(p.parameters()) == list(enc.parameters())  # what the user's optimizer gets


def test_order_mistakes_are_typed_errors():
    enc = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Sigmoid())
    p = splitcem.protect(enc, [{"name": "noise", "sigma": 0.1}], cem=0.5, num_classes=2)
    with pytest.raises(ProtectError, match=r"call protected\(x\)"):
        p.loss(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ProtectError, match="attached by the first forward"):
        p.epoch_end()
    p(torch.randn(4, 3, 6, 6))
    with pytest.raises(ProtectError, match=r"class indices of shape \(4,\).*got shape \(3,\)"):
        p.loss(torch.zeros(3, dtype=torch.long))
    with torch.no_grad():
        p(torch.randn(4, 3, 6, 6))  # evaluation forwards are not training steps
    with pytest.raises(ProtectError):
        p.loss(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ConfigError, match="num_classes"):
        splitcem.protect(enc, ["noise"], cem=0.5)
    with pytest.raises(ConfigError, match="lamda"):
        splitcem.protect(enc, ["noise"], cem={"lamda": 0.5}, num_classes=2)
    with pytest.raises(ConfigError, match="protected already"):
        splitcem.protect(p, ["noise"])
    scaled = splitcem.protect(enc, ["noise"], cem={"lambda": 1, "lr_scaling": True},
                              num_classes=2)
    scaled(torch.randn(4, 3, 6, 6))
    with pytest.raises(ConfigError, match="lr="):
        scaled.loss(torch.zeros(4, dtype=torch.long))


def _train(p: Protected, server: nn.Module, splits: DataSplits, epochs: int,
           batches: list | None = None) -> None:
    opt = torch.optim.Adam([*p.parameters(), *server.parameters()], lr=1e-3)
    loader = BatchLoader(splits.train, batch_size=32, shuffle=True, augment=False,
                         device="cpu", seed=0, drop_last=True)
    for _ in range(epochs):
        p.train()
        for x, y in loader:
            loss = F.cross_entropy(server(p(x)), y) + p.loss(y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        p.epoch_end(batches)


def test_state_dict_restores_mixture_counters_and_the_next_step():
    splits = toy_splits()
    torch.manual_seed(0)
    model = tiny_model()
    p = splitcem.protect(model.client, NOISE_CEM["defenses"], cem=NOISE_CEM["cem"],
                         num_classes=3)
    _train(p, model.server, splits, epochs=2)
    state = copy.deepcopy(p.state_dict())

    torch.manual_seed(5)  # other weights: everything must come from the state
    q = splitcem.protect(tiny_model().client, NOISE_CEM["defenses"], cem=NOISE_CEM["cem"],
                         num_classes=3)
    q.load_state_dict(state)  # before its first forward: the defenses are not set up yet
    assert (q.epoch, q.step) == (p.epoch, p.step)
    cem_p, cem_q = p.defenses.defenses[-1], q.defenses.defenses[-1]
    assert isinstance(cem_q, CEM) and torch.equal(cem_p.var, cem_q.var)
    x, y = next(iter(BatchLoader(splits.train, batch_size=32, shuffle=False, augment=False,
                                 device="cpu")))
    losses = []
    for prot in (p, q):
        prot.train()
        torch.manual_seed(7)
        z = prot(x)
        losses.append((z, prot.loss(y)))
    assert torch.equal(losses[0][0], losses[1][0])
    assert torch.equal(losses[0][1], losses[1][1]) and losses[0][1].detach().item() != 0.0


def test_adversary_and_pruning_state_travel_and_stay_out_of_the_users_optimizer():
    splits = toy_splits(size=16)  # SSIM's 11 x 11 window needs 11+ pixels
    torch.manual_seed(0)
    model = tiny_model(size=16)
    specs = [{"name": "noise", "sigma": 0.1},
             {"name": "adversarial", "width": 4, "depth": 0, "pretrain_epochs": 0},
             {"name": "patrol", "prune_epoch": 1, "importance_batches": 1}]
    info = splits.train.info
    p = splitcem.protect(model.client, specs, server=model.server, mean=info.mean, std=info.std)
    batches = list(BatchLoader(splits.train, batch_size=32, shuffle=False, augment=False,
                               device="cpu"))
    _train(p, model.server, splits, epochs=1, batches=batches)
    adv, patrol = p.defenses.defenses[1], p.defenses.defenses[2]
    assert all(q.grad is None for q in adv.decoder.parameters())  # its own optimizer only
    assert float(patrol.masks()[0].sum()) < patrol.masks()[0].numel()  # pruned at epoch 1
    state = copy.deepcopy(p.state_dict())

    torch.manual_seed(3)
    m2 = tiny_model(size=16)
    q = splitcem.protect(m2.client, specs, server=m2.server, mean=info.mean, std=info.std)
    q.load_state_dict(state)
    q.eval()
    with torch.no_grad():
        q(batches[0][0])  # first forward attaches the defenses with the loaded state
    for a, b in zip(adv.decoder.state_dict().values(),
                    q.defenses.defenses[1].decoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert torch.equal(patrol.masks()[0], q.defenses.defenses[2].masks()[0])
    assert q.defenses.defenses[1]._opt.state_dict()["state"]  # Adam moments restored


def test_patrol_needs_the_server_and_the_batches():
    splits = toy_splits()
    torch.manual_seed(0)
    model = tiny_model()
    p = splitcem.protect(model.client, [{"name": "patrol", "prune_epoch": 1}])
    with pytest.raises(ProtectError, match="batches="):
        _train(p, model.server, splits, epochs=1)
    p2 = splitcem.protect(tiny_model().client, [{"name": "patrol", "prune_epoch": 1}])
    batches = [next(iter(BatchLoader(splits.train, batch_size=32, shuffle=False,
                                     augment=False, device="cpu")))]
    with pytest.raises(ConfigError, match="server=server"):
        _train(p2, model.server, splits, epochs=1, batches=batches)
