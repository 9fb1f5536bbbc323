"""splitcem.split / cut_points: the halves compose to the original model exactly."""

from __future__ import annotations

from collections import OrderedDict

import pytest
import torch
from torch import nn

import splitcem
from splitcem.errors import ConfigError, CutPointError
from splitcem.models import create_split_model, register_model
from splitcem.models.registry import MODELS


def flat_seq() -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True), nn.MaxPool2d(2),
        nn.Conv2d(8, 4, 3, padding=1), nn.Sigmoid(), nn.Flatten(), nn.Linear(4 * 4 * 4, 5),
    )


def nested_seq() -> nn.Sequential:
    return nn.Sequential(OrderedDict(
        stem=nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU()),
        body=nn.Sequential(OrderedDict(
            block1=nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2)),
            block2=nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU()),
        )),
        head=nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 5)),
    ))


class UserCNN(nn.Module):
    """Named blocks and a functional flatten before the classifier (torchvision's VGG style)."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(inplace=True),
            nn.MaxPool2d(2), nn.Conv2d(8, 4, 3, padding=1), nn.Sigmoid(),
        )
        self.pool = nn.AdaptiveAvgPool2d(2)
        self.classifier = nn.Sequential(nn.Linear(16, 12), nn.ReLU(), nn.Dropout(0.5),
                                        nn.Linear(12, 5))

    def forward(self, x):
        x = self.pool(self.features(x))
        return self.classifier(torch.flatten(x, 1))


class OutOfOrder(nn.Module):
    """Children registered in another order than the forward calls them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8 * 4 * 4, 3)
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.fc(self.act(self.conv(x)).flatten(1))


class Residual(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(c, c, 3, padding=1)
        self.conv2 = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.conv1(x)))


class ResNetLike(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layer1 = nn.Sequential(Residual(8), Residual(8))
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 5))

    def forward(self, x):
        return self.head(self.layer1(self.stem(x)))


MODELS_UNDER_TEST = {"flat": flat_seq, "nested": nested_seq, "user_cnn": UserCNN,
                     "out_of_order": OutOfOrder, "resnet_like": ResNetLike}


@pytest.mark.parametrize("make", list(MODELS_UNDER_TEST.values()), ids=list(MODELS_UNDER_TEST))
def test_every_cut_composes_exactly(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(4, 3, 8, 8)
    points = splitcem.cut_points(model, x)
    assert len(points) >= 2
    model.eval()
    want = model(x)
    for p in points:
        client, server = splitcem.split(model, at=p.name, example=x)
        z = client(x)
        assert tuple(z.shape[1:]) == p.shape
        assert torch.equal(server(z), want), p.name
        # the halves share the model's modules, under the model's own names
        assert set(client.state_dict()) | set(server.state_dict()) == set(model.state_dict())
        assert p.client_parameters == sum(q.numel() for q in client.parameters())


def test_sequential_needs_no_example_and_train_mode_matches():
    torch.manual_seed(0)
    model = nested_seq()
    client, server = splitcem.split(model, at="body.block1.2")
    x = torch.randn(4, 3, 8, 8)
    assert torch.equal(server(client(x)), model(x))  # train mode: BN batch statistics
    assert next(iter(client.state_dict())) == "stem.0.weight"
    assert client.body.block1[0] is model.body.block1[0]  # shared, not copied


def test_flatten_moves_to_the_server_and_modes_are_restored():
    torch.manual_seed(0)
    model = UserCNN().train()
    bn = model.features[1]
    before = bn.running_mean.clone()
    x = torch.randn(4, 3, 8, 8)
    client, server = splitcem.split(model, at="pool", example=x)
    assert model.training and all(m.training for m in model.modules())
    assert torch.equal(bn.running_mean, before)  # the example ran in eval mode
    assert isinstance(server[0], nn.Flatten)
    assert client(x).shape == (4, 4, 2, 2)


def test_bad_names_list_the_valid_cut_points():
    model = UserCNN()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(CutPointError) as e:
        splitcem.split(model, at="features.9", example=x)
    msg = str(e.value)
    assert "no submodule named 'features.9'" in msg
    assert "features.5 -> 4 x 4 x 4" in msg and "pool -> 4 x 2 x 2" in msg
    with pytest.raises(CutPointError, match="ends the model"):
        splitcem.split(model, at="classifier", example=x)
    with pytest.raises(CutPointError, match="pass example="):
        splitcem.split(model, at="pool")
    assert isinstance(e.value, ConfigError)


def test_cut_inside_a_residual_block_is_refused():
    model = ResNetLike()
    x = torch.randn(2, 3, 8, 8)
    names = [p.name for p in splitcem.cut_points(model, x)]
    assert "layer1.0" in names and "layer1.0.conv1" not in names
    not_chain = r"inside 'layer1\.0', whose forward is not a chain"
    with pytest.raises(CutPointError, match=not_chain) as e:
        splitcem.split(model, at="layer1.0.conv1", example=x)
    assert "skip connection" in str(e.value)
    assert "layer1.1 -> 8 x 8 x 8" in str(e.value)


def test_a_functional_op_between_children_is_refused():
    class Hidden(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 4, 3)
            self.b = nn.Conv2d(4, 4, 3)
            self.c = nn.Conv2d(4, 2, 3)

        def forward(self, x):
            return self.c(torch.tanh(self.b(self.a(x))))  # tanh is not a child

    x = torch.randn(2, 3, 8, 8)
    assert splitcem.cut_points(Hidden(), x) == []
    with pytest.raises(CutPointError, match="functional op"):
        splitcem.split(Hidden(), at="a", example=x)


@pytest.fixture
def tiny_cnn_registered():
    @register_model("test_user_cnn")
    def make(*, num_classes: int = 5, in_channels: int = 3) -> UserCNN:
        """A test CNN (always 5 classes)."""
        return UserCNN()

    yield "test_user_cnn"
    MODELS._entries.pop("test_user_cnn")


def test_registered_module_is_cut_by_name_in_the_yaml_path(tiny_cnn_registered):
    torch.manual_seed(0)
    m = create_split_model(tiny_cnn_registered, num_classes=5, image_size=8, cut="features.5",
                           bottleneck_channels=None, activation="none")
    torch.manual_seed(0)
    ref = UserCNN()
    x = torch.randn(3, 3, 8, 8)
    m.eval()
    ref.eval()
    assert torch.equal(m(x), ref(x))  # same init under the same seed, same function
    assert m.feature_shape == (4, 4, 4) and m.config["cut"] == "features.5"
    # the run's bottleneck and activation wrap a plugin model's cut like a backbone's
    m2 = create_split_model(tiny_cnn_registered, num_classes=5, image_size=8, cut="features.2",
                            bottleneck_channels=2, bottleneck_stride=2)
    assert m2.feature_shape == (2, 4, 4) and m2(x).shape == (3, 5)
    with pytest.raises(ConfigError, match="cut must name"):
        create_split_model(tiny_cnn_registered, num_classes=5, image_size=8, cut=2)
    with pytest.raises(ConfigError, match="takes no width"):
        create_split_model(tiny_cnn_registered, num_classes=5, image_size=8, cut="pool",
                           client_width=0.5)
    with pytest.raises(ConfigError, match="outputs shape"):
        create_split_model(tiny_cnn_registered, num_classes=10, image_size=8, cut="pool")
    with pytest.raises(CutPointError, match=r"features\.5 -> 4 x 4 x 4"):
        create_split_model(tiny_cnn_registered, num_classes=5, image_size=8, cut="nope")
