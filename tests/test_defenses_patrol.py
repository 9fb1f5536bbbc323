"""PATROL channel pruning: which channels, exact zeros, training continues, state, importance."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from splitcem.defenses import EpochContext, SetupContext, create_defense
from splitcem.defenses.patrol import prunable_layers
from splitcem.models import create_split_model


def tiny_model(seed: int = 0):
    torch.manual_seed(seed)
    return create_split_model(
        "vgg11_bn", num_classes=10, image_size=16, client_width=0.25, server_width=0.25
    )


def ctx(model) -> SetupContext:
    return SetupContext(
        model=model, num_classes=10, device=torch.device("cpu"), noise_sigma=0.0,
        train_size=64, steps_per_epoch=4, epochs=3, feature_shape=model.feature_shape,
    )


def batches(n: int = 3, b: int = 16):
    def it():
        g = torch.Generator().manual_seed(5)
        for _ in range(n):
            yield torch.randn(b, 3, 16, 16, generator=g), torch.randint(0, 10, (b,), generator=g)

    return it


def epoch_ctx(model, epoch: int) -> EpochContext:
    return EpochContext(model, epoch=epoch, device=torch.device("cpu"), train_batches=batches())


def pruned_setup(scope: str = "last", ratio: float = 0.5, prune_epoch: int = 2):
    model = tiny_model()
    d = create_defense("patrol", ratio=ratio, prune_epoch=prune_epoch, importance_batches=2,
                       scope=scope)
    d.setup(ctx(model))
    return model, d


def test_layer_selection():
    model = tiny_model()
    feats = model.client.features
    last = prunable_layers(model.client, "last")
    assert last == [(feats[2][0], feats[2][1])]  # last conv before the bottleneck, its BN
    every = prunable_layers(model.client, "all")
    assert every == [(feats[0][0], feats[0][1]), (feats[2][0], feats[2][1])]
    assert all(c is not model.client.bottleneck for c, _ in every)


def test_prunes_only_at_prune_epoch_and_counts():
    model, d = pruned_setup(ratio=0.5, prune_epoch=2)
    assert d.on_epoch_end(epoch_ctx(model, 0)) == {}  # epoch 1: nothing yet
    assert d.masks()[0].sum() == d.masks()[0].numel()
    out = d.on_epoch_end(epoch_ctx(model, 1))  # end of epoch 2 (1-based): prune
    m = d.masks()[0]
    c = m.numel()  # 32 channels at width 0.25
    assert int((m == 0).sum()) == c // 2
    assert out == {"pruned_channels": c // 2, "kept_fraction": 0.5}
    d.on_epoch_end(epoch_ctx(model, 2))  # later epochs do not prune again
    assert int((d.masks()[0] == 0).sum()) == c // 2


@pytest.mark.parametrize("scope", ["last", "all"])
def test_pruned_channels_output_exactly_zero(scope):
    model, d = pruned_setup(scope=scope)
    d.on_epoch_end(epoch_ctx(model, 1))
    seen = []
    hooks = [relu.register_forward_hook(lambda m, i, o: seen.append(o.detach().clone()))
             for relu in (model.client.features[0][2], model.client.features[2][2])]
    x, _ = next(batches()())
    for train in (True, False):
        model.train(train)
        seen.clear()
        model.client(x)
        outs = seen if scope == "all" else seen[1:]
        for o, mask in zip(outs, d.masks(), strict=True):
            dead = mask == 0
            assert dead.any()
            assert torch.equal(o[:, dead], torch.zeros_like(o[:, dead]))
            assert o[:, ~dead].abs().sum() > 0
    for h in hooks:
        h.remove()


def test_remaining_parameters_keep_training():
    model, d = pruned_setup()
    d.on_epoch_end(epoch_ctx(model, 1))
    model.train()
    x, y = next(batches()())
    F.cross_entropy(model(x), y).backward()
    conv, _ = prunable_layers(model.client, "last")[0]
    dead = d.masks()[0] == 0
    assert conv.weight.grad[~dead].abs().sum() > 0
    assert conv.weight.grad[dead].abs().sum() == 0  # silenced channels learn nothing
    for p in (model.client.features[0][0].weight, model.client.bottleneck.weight):
        assert p.grad is not None and p.grad.abs().sum() > 0
    # an optimizer step keeps the pruned channels at exactly zero (the mask, not the weights)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    opt.step()
    seen = []
    h = model.client.features[2][2].register_forward_hook(lambda m, i, o: seen.append(o))
    model.client(x)
    h.remove()
    assert torch.equal(seen[0][:, dead], torch.zeros_like(seen[0][:, dead]))


def test_masks_in_state_dict_and_baked_into_model():
    model, d = pruned_setup()
    d.on_epoch_end(epoch_ctx(model, 1))
    state = d.state_dict()
    assert {"mask0", "pruned"} <= set(state)
    # resume: a fresh defense set up on a fresh model loads the masks
    model2 = tiny_model(1)
    d2 = create_defense("patrol", ratio=0.5, prune_epoch=2, importance_batches=2)
    d2.setup(ctx(model2))
    d2.load_state_dict(state)
    assert torch.equal(d2.masks()[0], d.masks()[0]) and bool(d2.pruned)
    # the model's own weights carry the pruning: a model without hooks is pruned too
    plain = tiny_model(2)
    plain.load_state_dict(model.state_dict())
    plain.eval()
    seen = []
    plain.client.features[2][2].register_forward_hook(lambda m, i, o: seen.append(o))
    plain.client(next(batches()())[0])
    dead = d.masks()[0] == 0
    assert torch.equal(seen[0][:, dead], torch.zeros_like(seen[0][:, dead]))


def test_taylor_importance_matches_manual_computation():
    model, d = pruned_setup()
    _, bn = prunable_layers(model.client, "last")[0]
    model.eval()
    expected = torch.zeros(bn.num_features)
    acts: list[torch.Tensor] = []
    h = bn.register_forward_hook(lambda m, i, o: acts.append(o))
    for x, y in list(batches()())[:2]:
        acts.clear()
        loss = F.cross_entropy(model(x), y, reduction="sum")
        (g,) = torch.autograd.grad(loss, acts[0])
        expected += (acts[0] * g).mean(dim=(2, 3)).abs().sum(0)
    h.remove()
    model.train()
    got = d._importance(epoch_ctx(model, 1))[0]
    torch.testing.assert_close(got, expected)
    assert model.training  # mode restored
    assert all(p.grad is None for p in model.parameters())  # no gradient left behind
    # the pruned channels are the least important ones
    d.on_epoch_end(epoch_ctx(model, 1))
    dead = d.masks()[0] == 0
    assert expected[dead].max() <= expected[~dead].min()
