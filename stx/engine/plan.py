"""One memory plan for a job: estimate what its largest level needs, check that against the device,
and decide whether to tile (``schedule.tile``, :mod:`stx.engine.tiling`) and with which tile, in one place
(:func:`plan_memory`, before any input is decoded).

The estimate (bytes, float32) counts what dominates an image optimisation step at the largest
level: the encoder's activations kept for the backward pass and its gradients (1.25 × the sum of
every leaf module's output up to the deepest layer used, softmax copies included, from
:meth:`stx.engine.encoders.MultiLayerEncoder.activation_elements`; calibrated on VGG on the CPU, where a
1024 px Adam run's peak memory grew by 1.00 × that sum over a 32 px run), the MRF losses' patch matrices and
patch-similarity matrices, what other loss terms keep per evaluation (``Loss.working_floats``:
guided losses' masked features, W2's centred features, normalised gradients), the image, its
gradient and the optimiser's state (L-BFGS keeps ``2 × history_size`` image-sized vectors). On
the CPU it also counts decoding the largest input file (:func:`stx.engine.inputs.decode_bytes`; before
the optimisation, summed with it, which errs on the safe side); on a CUDA device that happens in host
memory and is not counted. A size that does not fit can be tiled, lowered, or run on a device with
more memory.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from stx.engine.inputs import InputFiles
from stx.engine.losses import EncodingLoss, MRFStyleLoss, PerceptualObjective
from stx.engine.optim import Schedule
from stx.engine.tiling import Reach, TiledObjective, check_tileable
from stx.errors import ConfigError

FLOAT = 4
ACTIVATION_FACTOR = 1.25
HEADROOM = 0.9
"""Fraction of the free memory a job may plan to use."""
DECODING = "decoding the largest input"
TILE_CANDIDATES = (4096, 3072, 2048, 1536, 1024, 768, 512, 384, 256, 128, 64)
"""Tile edges (px) ``schedule.tile=auto`` tries, largest first."""


@dataclass(frozen=True)
class MemoryPlan:
    """How a job's largest level runs: ``estimate`` (peak bytes by component) fits the device,
    untiled (``tile`` None) or tile by tile with ``tile`` px tiles; ``shape`` is that level's
    ``(H, W)`` and ``content_shape`` the content file's."""

    estimate: dict[str, int]
    tile: int | None
    shape: tuple[int, int]
    content_shape: tuple[int, int]

    def apply(self, objective: PerceptualObjective) -> PerceptualObjective | TiledObjective:
        """The objective to optimise: ``objective`` itself, or tiled."""
        return objective if self.tile is None else TiledObjective(objective, self.tile)


def plan_memory(setting: str, objective: PerceptualObjective, schedule: Schedule, files: InputFiles,
                device: torch.device) -> MemoryPlan:
    """The plan for ``schedule.tile`` = ``setting`` (``off``, ``auto`` or a tile edge in px) for the
    checked input ``files``, after checking that the largest level fits ``device``
    (:func:`check_fits`, else :class:`ConfigError`): ``auto`` tiles only when the untiled job does
    not fit, with the largest of :data:`TILE_CANDIDATES` that does."""
    setting = str(setting).strip().lower()
    if setting not in ("off", "auto") and not setting.isdigit():
        raise ConfigError(f"schedule.tile={setting!r} is not valid; use off, auto, or a tile edge in px (e.g. 512).")
    height, width = files.shape
    reach, untileable = None, None
    if setting != "off" and objective.encoder is not None:
        try:
            reach = check_tileable(objective, tile=int(setting) if setting.isdigit() else None)
        except ConfigError as reason:
            if setting != "auto":
                raise
            untileable = reason
    counts = schedule.state_images, len(files.styles), files.decoding

    def fitting(tile: int | None) -> MemoryPlan:
        estimate = (estimate_bytes(objective, height, width, *counts) if tile is None
                    else tiled_estimate(objective, height, width, tile, reach, *counts))
        check_fits(estimate, device, schedule.size)
        return MemoryPlan(estimate, tile, (height, width), files.content_shape)

    if setting.isdigit() and reach is not None:
        return fitting(int(setting))
    try:
        return fitting(None)
    except ConfigError as untiled_error:
        if setting != "auto" or objective.encoder is None:
            raise
        if untileable is not None:
            raise ConfigError(f"{untiled_error} Tiling (schedule.tile=auto) cannot help here: {untileable}") from untileable
        error = untiled_error
    for tile in (t for t in TILE_CANDIDATES if t % reach.align == 0 and t < max(height, width)):
        try:
            return fitting(tile)
        except ConfigError as too_large:
            error = too_large
    raise error


def tiled_estimate(objective: PerceptualObjective, height: int, width: int, tile: int, reach: Reach,
                   state_images: int, styles: int, decoding: int = 0) -> dict[str, int]:
    """Estimated peak bytes of one tiled evaluation at ``height×width`` (see :func:`estimate_bytes`;
    ``reach`` from :func:`~stx.engine.tiling.check_tileable`): the encoder and the loss statistics at
    one tile with its halo, the whole image, its gradient and the optimiser's state, and the content
    targets' whole feature maps."""
    edge = lambda length: min(length, tile + math.ceil(reach.before / reach.align) * reach.align + reach.after)
    estimate = estimate_bytes(objective, edge(height), edge(width), 0, styles)
    estimate.pop("image and optimiser")
    estimate["encoder activations (one tile)"] = estimate.pop("encoder activations")
    whole = estimate_bytes(objective, height, width, state_images + 1, styles, decoding)  # + the gradient
    shapes = objective.encoder.layer_shapes(height, width)
    positional = sum(math.prod(shapes[layer]) for loss in objective.losses.values()
                     if isinstance(loss, EncodingLoss) and loss.positional for layer in loss.layers)
    return {**estimate, "image and optimiser": whole["image and optimiser"],
            "content target maps": positional * FLOAT, **({DECODING: decoding} if decoding else {})}


def estimate_bytes(
    objective: PerceptualObjective,
    height: int,
    width: int,
    optimizer_state_images: int,
    styles: int,
    decoding: int = 0,
) -> dict[str, int]:
    """Estimated peak bytes of one optimisation step at ``height×width``, by component, with
    ``decoding`` (bytes, :func:`~stx.engine.inputs.decode_bytes`) as a component of its own."""
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
