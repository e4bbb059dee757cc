"""FeatureHooks: outputs of named modules of a registry model, captured by forward hooks."""
import pytest
import torch
from conftest import THREADS

from kdrun.errors import ConfigError
from kdrun.losses.hooks import FeatureHooks
from kdrun.models import build_model

torch.set_num_threads(THREADS)


@pytest.fixture
def cnn():
    torch.manual_seed(0)
    return build_model("cnn", num_classes=10, in_channels=1, image_size=8, args={"channels": 4}).eval()


def test_captures_named_outputs_without_changing_the_model(cnn):
    x = torch.randn(3, 1, 8, 8)
    plain = cnn(x)
    with FeatureHooks(cnn, ["features.3", "classifier.1"]) as feats:
        logits = cnn(x)
    torch.testing.assert_close(logits, plain)
    assert set(feats) == {"features.3", "classifier.1"}
    assert feats["features.3"].shape == (3, 4, 4, 4)  # after the first conv block's max-pool
    torch.testing.assert_close(feats["features.3"], cnn.features[:4](x))
    assert feats["classifier.1"].shape == (3, 256)
    handles = sum(len(m._forward_hooks) for m in cnn.modules())
    assert handles == 0, "hooks must be removed on exit"


def test_output_is_cloned_before_an_in_place_relu(cnn):
    x = torch.randn(3, 1, 8, 8)
    with FeatureHooks(cnn, ["features.1"]) as feats:  # BatchNorm, followed by ReLU(inplace=True)
        cnn(x)
    assert (feats["features.1"] < 0).any()
    torch.testing.assert_close(feats["features.1"], cnn.features[:2](x))


def test_gradients_flow_through_captured_features(cnn):
    with FeatureHooks(cnn.train(), ["features.7"]) as feats:
        cnn(torch.randn(2, 1, 8, 8))
    feats["features.7"].pow(2).mean().backward()
    assert cnn.features[0].weight.grad is not None


def test_unknown_name_lists_the_valid_ones(cnn):
    with pytest.raises(ConfigError, match="features.9") as err:
        FeatureHooks(cnn, ["features.3", "features.9"], key="loss.student_layers")
    assert str(err.value).startswith("loss.student_layers: SimpleCnn has no module 'features.9'")
    assert "features.3" in str(err.value) and "classifier.4" in str(err.value)
    with pytest.raises(ConfigError):
        FeatureHooks(cnn, [""])  # the root is not a feature
