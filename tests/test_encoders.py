import pytest
import torch
from torchvision import models

from stx import encoders
from stx.errors import ConfigError, WeightsError


def reference_activations(model, image):
    """Run torchvision's full, untruncated feature stack and keep a copy of every output."""
    x = (image - torch.tensor(encoders.IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(encoders.IMAGENET_STD).view(1, 3, 1, 1)
    out = []
    for module in model.features:
        x = module(x.clone())
        out.append(x.clone())
    return dict(zip(encoders.vgg_layer_names(model.features), out))


def test_vgg19_layer_names_match_pystiche():
    names = encoders.vgg_layer_names(models.vgg19().features)
    assert names[:5] == ["conv1_1", "relu1_1", "conv1_2", "relu1_2", "pool1"]
    assert "relu4_2" in names and "relu5_4" in names and names[-1] == "pool5"
    assert len(names) == 37
    assert "relu5_4" not in encoders.vgg_layer_names(models.vgg16().features)


def test_truncated_encoder_matches_full_network(vgg19_random, rng):
    image = torch.rand(1, 3, 48, 40, generator=rng)
    model = models.vgg19(weights=None)
    model.features.load_state_dict(encoders._random_features("vgg19", seed=0).state_dict())
    reference = reference_activations(model, image)
    out = vgg19_random(image)
    assert set(out) == vgg19_random.layers
    for layer, activation in out.items():
        torch.testing.assert_close(activation, reference[layer], rtol=1e-5, atol=1e-5)
    # cut after the deepest requested layer (relu5_1 is module 29 of 37)
    assert len(vgg19_random.features) == vgg19_random.available.index("relu5_1") + 1


def test_conv_output_is_not_overwritten_by_inplace_relu(vgg19_random, rng):
    out = vgg19_random(torch.rand(1, 3, 32, 32, generator=rng), ["conv1_1", "relu1_1"])
    assert (out["conv1_1"] < 0).any()
    torch.testing.assert_close(out["relu1_1"], out["conv1_1"].clamp_min(0))


def test_unknown_layer_lists_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown encoder layer\(s\) 'relu9_9'.*valid layers are: conv1_1, relu1_1"):
        encoders.vgg19(["relu4_2", "relu9_9"], weights="random", pooling="max", seed=0)


def test_weights_from_local_file(tmp_path, rng):
    model = models.vgg16(weights=None)  # a whole-model state dict, as torchvision saves it
    model.features.load_state_dict(encoders._random_features("vgg16", seed=3).state_dict())
    torch.save(model.state_dict(), tmp_path / "vgg16.pth")
    from_file = encoders.vgg16(["relu3_3"], weights=str(tmp_path / "vgg16.pth"), pooling="max", seed=0)
    seeded = encoders.vgg16(["relu3_3"], weights="random", seed=3, pooling="max")
    other = encoders.vgg16(["relu3_3"], weights="random", seed=4, pooling="max")
    image = torch.rand(1, 3, 32, 32, generator=rng)
    assert torch.equal(from_file(image)["relu3_3"], seeded(image)["relu3_3"])
    assert not torch.equal(other(image)["relu3_3"], seeded(image)["relu3_3"])


def test_bad_weights_file_errors(tmp_path):
    with pytest.raises(WeightsError, match="does not exist"):
        encoders.vgg19(["relu1_1"], weights=str(tmp_path / "missing.pth"), pooling="max", seed=0)
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    with pytest.raises(WeightsError, match="could not be loaded"):
        encoders.vgg19(["relu1_1"], weights=str(tmp_path / "junk.pth"), pooling="max", seed=0)


def test_offline_imagenet_says_where_to_put_the_file(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(WeightsError, match=r"vgg19-dcbb9e9d\.pth.*encoder\.weights=random"):
        encoders.vgg19(["relu1_1"], weights="imagenet", pooling="max", seed=0)


def test_avg_pooling_swap():
    encoder = encoders.vgg19(["relu2_1"], weights="random", pooling="avg", seed=0)
    assert any(isinstance(m, torch.nn.AvgPool2d) for m in encoder.features)
    assert not any(isinstance(m, torch.nn.MaxPool2d) for m in encoder.features)
    with pytest.raises(ConfigError, match="pooling='min'"):
        encoders.vgg19(["relu2_1"], weights="random", pooling="min", seed=0)
