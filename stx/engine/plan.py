"""One memory plan for a job: check its inputs against the encoder, estimate what its largest level
needs (:mod:`stx.engine.memory`), check that against the device, and decide whether to tile
(``schedule.tile``, :mod:`stx.engine.tiling`) and with which tile, in one place.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from stx.engine import memory
from stx.engine.image import image_shape, long_edge_shape
from stx.engine.losses import EncodingLoss, PerceptualObjective
from stx.engine.optim import Schedule
from stx.engine.tiling import TiledObjective, check_tileable
from stx.errors import ConfigError

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


def tiled_estimate(objective: PerceptualObjective, height: int, width: int, tile: int, state_images: int,
                   styles: int, decoding: int = 0) -> dict[str, int]:
    """Estimated peak bytes of one tiled evaluation at ``height×width`` (see
    :func:`stx.engine.memory.estimate_bytes`): the encoder and the loss statistics at one tile with its
    halo, the whole image, its gradient and the optimiser's state, and the content targets'
    whole feature maps."""
    reach = check_tileable(objective)
    edge = lambda length: min(length, tile + math.ceil(reach.before / reach.align) * reach.align + reach.after)
    estimate = memory.estimate_bytes(objective, edge(height), edge(width), 0, styles)
    estimate.pop("image and optimiser")
    estimate["encoder activations (one tile)"] = estimate.pop("encoder activations")
    whole = memory.estimate_bytes(objective, height, width, state_images + 1, styles, decoding)  # + the gradient
    shapes = objective.encoder.layer_shapes(height, width)
    positional = sum(math.prod(shapes[layer]) for loss in objective.losses.values()
                     if isinstance(loss, EncodingLoss) and loss.positional for layer in loss.layers)
    return {**estimate, "image and optimiser": whole["image and optimiser"],
            "content target maps": positional * memory.FLOAT, **({memory.DECODING: decoding} if decoding else {})}


def plan_memory(setting: str, objective: PerceptualObjective, schedule: Schedule, content: Path,
                styles: Sequence[Path], device: torch.device) -> MemoryPlan:
    """The plan for ``schedule.tile`` = ``setting`` (``off``, ``auto`` or a tile edge in px), after
    checking the inputs (:func:`stx.engine.memory.check_inputs`) and that the largest level fits
    ``device`` (:func:`stx.engine.memory.check_fits`, else :class:`ConfigError`): ``auto`` tiles
    only when the untiled job does not fit, with the largest of :data:`TILE_CANDIDATES` that does."""
    decoding = memory.check_inputs(objective, schedule, content, styles)
    content_shape = image_shape(content)
    height, width = long_edge_shape(*content_shape, schedule.size)
    state, count, size = schedule.state_images, len(styles), schedule.size

    def fitting(estimate: dict[str, int], tile: int | None) -> MemoryPlan:
        memory.check_fits(estimate, device, size)
        return MemoryPlan(estimate, tile, (height, width), content_shape)

    setting = str(setting).strip().lower()
    if setting in ("off", "auto") or objective.encoder is None:
        try:
            return fitting(memory.estimate_bytes(objective, height, width, state, count, decoding), None)
        except ConfigError as untiled_error:
            if setting != "auto" or objective.encoder is None:
                raise
            try:
                reach = check_tileable(objective)
            except ConfigError as reason:
                raise ConfigError(f"{untiled_error} Tiling (schedule.tile=auto) cannot help here: {reason}") from reason
            error = untiled_error
        for tile in (t for t in TILE_CANDIDATES if t % reach.align == 0 and t < max(height, width)):
            try:
                return fitting(tiled_estimate(objective, height, width, tile, state, count, decoding), tile)
            except ConfigError as too_large:
                error = too_large
        raise error
    if not setting.isdigit():
        raise ConfigError(f"schedule.tile={setting!r} is not valid; use off, auto, or a tile edge in px (e.g. 512).")
    tile = TiledObjective(objective, int(setting)).tile  # checks the tile against the encoder's stride
    return fitting(tiled_estimate(objective, height, width, tile, state, count, decoding), tile)
