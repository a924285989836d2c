"""Up-front size checks: a job whose inputs are too small or thin for its layers at the smallest
level (:func:`check_inputs`), or whose largest level would not fit the device, is refused.

The estimate (bytes, float32) counts what dominates an image optimisation step at the largest
level: the encoder's activations kept for the backward pass and its gradients (1.25 × the sum of
every leaf module's output up to the deepest layer used, softmax copies included, from
:meth:`stx.engine.encoders.MultiLayerEncoder.activation_elements`; calibrated on VGG on the CPU, where a
1024 px Adam run's peak memory grew by 1.00 × that sum over a 32 px run), the MRF losses' patch matrices and
patch-similarity matrices, what other loss terms keep per evaluation (``Loss.working_floats``:
guided losses' masked features, W2's centred features, normalised gradients), the image, its
gradient and the optimiser's state (L-BFGS keeps ``2 × history_size`` image-sized vectors). On
the CPU it also counts decoding the largest input file (before the optimisation; summed with it,
which errs on the safe side); on a CUDA device that happens in host memory and is not counted.
A size that does not fit can be tiled (``schedule.tile``, :mod:`stx.engine.tiling`), lowered, or run on a
device with more memory.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import torch

from stx.engine.encoders import MultiLayerEncoder
from stx.engine.image import image_shape, long_edge_shape, reduction_factor
from stx.engine.losses import MRFStyleLoss, PerceptualObjective
from stx.engine.optim import Schedule
from stx.errors import ConfigError

FLOAT = 4
ACTIVATION_FACTOR = 1.25
HEADROOM = 0.9
"""Fraction of the free memory a job may plan to use."""
DECODED_BYTES_PER_PIXEL = 8
"""Peak bytes per pixel of an input file while :func:`stx.engine.image.read_image` decodes it: Pillow's
image and one converted copy (measured on the CPU: RGB 4.4, palette 5, 16-bit grey 6, RGBA 8, CMYK 8)."""
WORKING_BYTES_PER_PIXEL = 16
"""Bytes per pixel of the (reduced) copy it turns into a float tensor (measured: an unreduced
RGB file peaks at 20 = 4 + 16)."""
DECODING = "decoding the largest input"


def layer_shapes(encoder: MultiLayerEncoder, height: int, width: int) -> list[tuple[int, int, int]]:
    """``(C, H, W)`` of each layer's output of an encoder's stack for an ``H×W`` input."""
    return list(encoder.layer_shapes(height, width).values())


def decode_bytes(height: int, width: int, size: int) -> int:
    """Peak bytes of reading an ``H×W`` input file at a long edge of ``size`` px."""
    factor = reduction_factor(max(height, width), size)
    reduced = math.ceil(height / factor) * math.ceil(width / factor)
    return DECODED_BYTES_PER_PIXEL * height * width + WORKING_BYTES_PER_PIXEL * reduced


def check_encodable(objective: PerceptualObjective, what: str, height: int, width: int) -> None:
    """Raise :class:`ConfigError` when an ``H×W`` image (``what``: which one, where) leaves a layer
    the objective reads too small: any layer under 1 px, an MRF layer under its patch size (the
    encoder's shapes for this input, :meth:`~stx.engine.encoders.MultiLayerEncoder.fits`)."""
    if objective.encoder is None:
        return
    names = objective.encoder.names
    needs = {names[-1]: 1}  # the deepest layer has been through every pooling
    for loss in objective.losses.values():
        if isinstance(loss, MRFStyleLoss):
            needs.update({layer: max(needs.get(layer, 1), loss.patch_size) for layer in loss.layers})
    short = [layer for layer, need in needs.items() if not objective.encoder.fits(layer, need, height, width)]
    if short:
        edges = {layer: objective.encoder.min_edge(layer, needs[layer]) for layer in short}
        layer = max(edges, key=edges.get)
        raise ConfigError(
            f"{what} is only {width}×{height} px, too small for the loss set: layer {layer} comes "
            f"after {objective.encoder.downsamplings(layer)} and needs {needs[layer]} px on both "
            f"edges there, i.e. at least {edges[layer]} px in the image; use a larger schedule.size "
            f"(smallest pyramid level), a less elongated image (crop it), or shallower layers."
        )


def check_inputs(objective: PerceptualObjective, schedule: Schedule, content: Path, styles: Sequence[Path]) -> int:
    """Check, from their headers, that the content and style images survive the encoder at the
    smallest pyramid level (:func:`check_encodable`); return the peak bytes of decoding the
    largest of them at the largest level (:func:`decode_bytes`)."""
    smallest = min(level.size for level in schedule.levels)
    style_edges = schedule.style_edge(smallest), schedule.style_edge(schedule.size)
    inputs = [("images.content", content, smallest, schedule.size), *(("images.styles", path, *style_edges) for path in styles)]
    decoding = 0
    for key, path, low, high in inputs:
        height, width = image_shape(path)
        what = f"{key} {str(path)!r} ({width}×{height} px) at the {low} px pyramid level"
        check_encodable(objective, what, *long_edge_shape(height, width, low))
        decoding = max(decoding, decode_bytes(height, width, high))
    return decoding


def estimate_bytes(
    objective: PerceptualObjective,
    height: int,
    width: int,
    optimizer_state_images: int,
    styles: int,
    decoding: int = 0,
) -> dict[str, int]:
    """Estimated peak bytes of one optimisation step at ``height×width``, by component, with
    ``decoding`` (bytes, :func:`check_inputs`) as a component of its own."""
    estimate = {"image and optimiser": (2 + optimizer_state_images) * 3 * height * width * FLOAT}
    if objective.encoder is not None:
        shapes = objective.encoder.layer_shapes(height, width)
        elements = objective.encoder.activation_elements(height, width)
        estimate["encoder activations"] = round(ACTIVATION_FACTOR * elements * FLOAT)
        mrf = 0
        for loss in objective.losses.values():
            if isinstance(loss, MRFStyleLoss):
                for layer in loss.layers:
                    c, h, w = shapes[layer]
                    patches = max(1, (h - loss.patch_size) // loss.stride + 1) * max(1, (w - loss.patch_size) // loss.stride + 1)
                    targets = max(1, (h - loss.patch_size) // loss.target_stride + 1) * max(1, (w - loss.patch_size) // loss.target_stride + 1)
                    dims = c * loss.patch_size**2
                    mrf += (3 * patches * dims + styles * targets * (2 * dims + patches)) * FLOAT
        if mrf:
            estimate["MRF patches and similarities"] = mrf
        statistics = sum(loss.working_floats(shapes) for loss in objective.losses.values())
        if statistics:
            estimate["loss statistics"] = statistics * FLOAT
    if decoding:
        estimate[DECODING] = decoding
    return estimate


def available_bytes(device: torch.device) -> int:
    """Free memory on ``device``: CUDA's free memory, or the system's MemAvailable for the CPU."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        for line in meminfo.read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def check_fits(estimate: dict[str, int], device: torch.device, size: int) -> None:
    """Raise :class:`ConfigError` with the estimate when it exceeds the device's free memory."""
    counted = {name: value for name, value in estimate.items() if name != DECODING or device.type == "cpu"}
    needed, free = sum(counted.values()), available_bytes(device)
    if needed > HEADROOM * free:
        parts = ", ".join(f"{name} {value / 2**30:.2f} GiB" for name, value in counted.items())
        raise ConfigError(
            f"schedule size {size} px needs about {needed / 2**30:.1f} GiB on {device} ({parts}), but only "
            f"{free / 2**30:.1f} GiB is free; set schedule.tile=auto (exact, tile by tile), lower schedule.size (or the pyramid's largest level), use "
            f"fewer or coarser MRF layers (larger stride), downscale very large input files, or use a "
            f"device with more memory."
        )
