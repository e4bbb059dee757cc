"""Tests of the model registry: every model on every dataset shape, reference layouts, errors."""
import pytest
import torch
from conftest import THREADS
from torch import nn

from kdrun.errors import ConfigError
from kdrun.models import build_model, list_models, model_args

torch.set_num_threads(THREADS)

SHAPES = [(1, 8, 10), (1, 28, 10), (3, 32, 100), (3, 96, 7)]
NAMES = [name for name, _ in list_models()]


class FmnistCnnTeacher(nn.Module):
    def __init__(self, num_classes=10, dropout=0.25):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True),
            nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 256), nn.ReLU(inplace=True), nn.Dropout(dropout),
            nn.Linear(256, num_classes),
        )

    def forward(self, x):
        return self.classifier(self.features(x))


class FmnistMlp(nn.Module):
    def __init__(self, num_classes=10, hidden=256):
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, hidden), nn.ReLU(inplace=True),
                                 nn.Linear(hidden, num_classes))

    def forward(self, x):
        return self.net(x)


def test_registry_lists_expected_models():
    expected = {"resnet18", "resnet34", "resnet50", "mobilenet", "mobilenet_v3_small", "cnn",
                "mlp", "resnet8x4", "resnet32x4", "wrn_16_2", "wrn_40_2"} | set(CIFAR_PARAMS)
    assert expected <= set(NAMES)
    assert NAMES == sorted(NAMES)
    assert all(desc and "\n" not in desc for _, desc in list_models())


# Parameter counts with num_classes=100, in_channels=3, image_size=32 of the reference implementations in
# HobbitLong/RepDistiller (the same definitions as megvii-research/mdistiller mdistiller/models/cifar/),
# counted on the reference code itself: models/resnet.py (resnet20/32/56/110/8x4/32x4), models/wrn.py
# (wrn_16_2, wrn_40_1, wrn_40_2), models/vgg.py (vgg8_bn, vgg11_bn, vgg13_bn), models/ShuffleNetv1.py (ShuffleV1),
# models/ShuffleNetv2.py (ShuffleV2) and models/mobilenetv2.py (mobile_half).
CIFAR_PARAMS = {
    "resnet20": 278_324,  # models/resnet.py resnet20
    "resnet32": 472_756,  # models/resnet.py resnet32
    "resnet56": 861_620,  # models/resnet.py resnet56
    "resnet110": 1_736_564,  # models/resnet.py resnet110
    "resnet8x4": 1_233_540,  # models/resnet.py resnet8x4
    "resnet32x4": 7_433_860,  # models/resnet.py resnet32x4
    "wrn_16_2": 703_284,  # models/wrn.py wrn_16_2
    "wrn_40_1": 569_780,  # models/wrn.py wrn_40_1
    "wrn_40_2": 2_255_156,  # models/wrn.py wrn_40_2
    "vgg8": 3_965_028,  # models/vgg.py vgg8_bn
    "vgg11": 9_277_284,  # models/vgg.py vgg11_bn
    "vgg13": 9_462_180,  # models/vgg.py vgg13_bn
    "shufflenet_v1": 949_258,  # models/ShuffleNetv1.py ShuffleV1
    "shufflenet_v2": 1_355_528,  # models/ShuffleNetv2.py ShuffleV2
    "mobilenet_v2_cifar": 812_836,  # models/mobilenetv2.py mobile_half
}


@pytest.mark.parametrize("name", sorted(CIFAR_PARAMS))
def test_cifar_models_match_reference_parameter_counts(name):
    # one build per model (forward on 1x28x28 and other shapes: test_output_shape)
    model = build_model(name, num_classes=100, in_channels=3, image_size=32).eval()
    assert sum(p.numel() for p in model.parameters()) == CIFAR_PARAMS[name]
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


@pytest.mark.parametrize("c,s,k", SHAPES, ids=[f"c{c}-s{s}-k{k}" for c, s, k in SHAPES])
@pytest.mark.parametrize("name", NAMES)
def test_output_shape(name, c, s, k):
    model = build_model(name, num_classes=k, in_channels=c, image_size=s).eval()
    with torch.no_grad():
        out = model(torch.randn(2, c, s, s))
    assert out.shape == (2, k)


@pytest.mark.parametrize("name,reference", [("cnn", FmnistCnnTeacher), ("mlp", FmnistMlp)])
def test_reference_state_dict_layout(name, reference):
    model = build_model(name, num_classes=10, in_channels=1, image_size=28)
    ref = reference(num_classes=10).state_dict()
    got = model.state_dict()
    assert list(got) == list(ref)
    assert {k: v.shape for k, v in got.items()} == {k: v.shape for k, v in ref.items()}
    model.load_state_dict(ref, strict=True)


def test_model_args_and_overrides():
    assert model_args("cnn") == {"hidden": 256, "dropout": 0.25, "channels": 32}
    assert model_args("mlp") == {"hidden": 256}
    assert model_args("resnet18") == {}
    model = build_model("cnn", num_classes=5, in_channels=3, image_size=32,
                        args={"hidden": 64, "channels": 8, "dropout": 0.0})
    assert model.features[0].weight.shape == (8, 3, 3, 3)
    assert model.classifier[1].weight.shape == (64, 16 * 8 * 8)
    small = build_model("mobilenet", num_classes=10, in_channels=3, image_size=32,
                        args={"width_mult": 0.5})
    full = build_model("mobilenet", num_classes=10, in_channels=3, image_size=32)
    assert sum(p.numel() for p in small.parameters()) < sum(p.numel() for p in full.parameters())


def test_unknown_name_lists_valid_names():
    with pytest.raises(ConfigError) as err:
        build_model("nope", num_classes=10, in_channels=1, image_size=28, key="teacher")
    assert err.value.key == "teacher.name"
    for name in NAMES:
        assert name in str(err.value)


def test_unknown_arg_names_key():
    with pytest.raises(ConfigError) as err:
        build_model("cnn", num_classes=10, in_channels=1, image_size=28,
                    args={"bogus": 1}, key="student")
    assert err.value.key == "student.args.bogus"
    assert str(err.value).startswith("student.args.bogus")
    assert "hidden" in str(err.value)
    with pytest.raises(ConfigError, match="student.args.width_mult"):
        build_model("resnet18", num_classes=10, in_channels=3, image_size=32,
                    args={"width_mult": 2.0}, key="student")
