"""Up-front memory estimate: a job whose largest level would not fit the device is refused.

The estimate (bytes, float32) counts what dominates an image optimisation step at the largest
level: the encoder's activations kept for the backward pass and its gradients (1.25 × the sum of
every layer's output up to the deepest layer used; calibrated on the CPU, where a 1024 px Adam
run's peak memory grew by 1.00 × that sum over a 32 px run), the MRF losses' patch matrices and
patch-similarity matrices, the image, its gradient and the optimiser's state (L-BFGS keeps
``2 × history_size`` image-sized vectors). There is no tiling: a size that does not fit must be
lowered, or run on a device with more memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from stx.errors import ConfigError
from stx.losses import MRFStyleLoss, PerceptualObjective

FLOAT = 4
ACTIVATION_FACTOR = 1.25
HEADROOM = 0.9
"""Fraction of the free memory a job may plan to use."""


def layer_shapes(encoder: nn.Module, height: int, width: int) -> list[tuple[int, int, int]]:
    """``(C, H, W)`` of each layer's output of a VGG-style stack for an ``H×W`` input."""
    shapes, channels = [], 3
    for module in encoder.features:
        if isinstance(module, nn.Conv2d):
            channels = module.out_channels
        elif isinstance(module, (nn.MaxPool2d, nn.AvgPool2d)):
            height, width = height // 2, width // 2
        shapes.append((channels, height, width))
    return shapes


def estimate_bytes(objective: PerceptualObjective, height: int, width: int, optimizer_state_images: int, styles: int) -> dict[str, int]:
    """Estimated peak bytes of one optimisation step at ``height×width``, by component."""
    estimate = {"image and optimiser": (2 + optimizer_state_images) * 3 * height * width * FLOAT}
    if objective.encoder is not None:
        shapes = dict(zip(objective.encoder.names, layer_shapes(objective.encoder, height, width)))
        estimate["encoder activations"] = round(ACTIVATION_FACTOR * sum(c * h * w for c, h, w in shapes.values()) * FLOAT)
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
    needed, free = sum(estimate.values()), available_bytes(device)
    if needed > HEADROOM * free:
        parts = ", ".join(f"{name} {value / 2**30:.2f} GiB" for name, value in estimate.items())
        raise ConfigError(
            f"schedule size {size} px needs about {needed / 2**30:.1f} GiB on {device} ({parts}), but only "
            f"{free / 2**30:.1f} GiB is free; lower schedule.size (or the pyramid's largest level), use "
            f"fewer or coarser MRF layers (larger stride), or a device with more memory."
        )
