"""Spatial guidance: reading and checking the masks and style images of guided losses' regions.

A :class:`~stx.engine.losses.GuidedGramStyleLoss` names its regions in its config (paths and weights);
:func:`load_guides` reads their pixels once, before any work starts, and refuses a mask that
cannot be read, whose aspect ratio differs from the image it guides (content or style), that is
all black, or that covers less than half a position of a guided layer at the smallest pyramid
level (its Gram would be that of nothing, or of a sliver of one position).
"""

from __future__ import annotations

from pathlib import Path

import torch

from stx.engine.image import image_shape, long_edge_shape, read_image, read_mask, resize_mask
from stx.engine.losses import Guide, GuidedGramStyleLoss, PerceptualObjective, Region
from stx.engine.memory import check_encodable, layer_shapes
from stx.engine.optim import Schedule
from stx.errors import ConfigError, ImageError

ASPECT_TOLERANCE = 0.01
"""Largest relative difference of width/height between a mask and the image it guides."""
MIN_COVERAGE = 0.5
"""Least total mask weight (positions, each weighted by its mask value in [0, 1]) a region must
have at every guided layer at the smallest pyramid level."""


def check_aspect(mask: Path, image: Path, where: str) -> None:
    """Raise :class:`ConfigError` when ``mask``'s aspect ratio differs from ``image``'s by more
    than :data:`ASPECT_TOLERANCE` (a mask may have another resolution)."""
    (mask_h, mask_w), (height, width) = image_shape(mask), image_shape(image)
    if abs(mask_w * height - width * mask_h) > ASPECT_TOLERANCE * width * mask_h:
        raise ConfigError(
            f"{where} {str(mask)!r} is {mask_w}×{mask_h} px (aspect {mask_w / mask_h:.3f}) but the image it "
            f"guides, {str(image)!r}, is {width}×{height} px (aspect {width / height:.3f}); draw the mask on "
            f"that image, or resize it to {width}×{height} (any resolution of the same aspect works)."
        )


def check_coverage(
    objective: PerceptualObjective, loss: GuidedGramStyleLoss, mask: torch.Tensor, shape: tuple[int, int],
    where: str, size: int,
) -> None:
    """Raise :class:`ConfigError` when ``mask`` is all black, or when, resized to ``shape`` (an
    image at the ``size`` px level) and to each of the loss's layers, it covers less than
    :data:`MIN_COVERAGE` positions of some layer."""
    if mask.max().item() == 0:
        raise ConfigError(f"{where} is empty (all black), so its region has no statistics; paint the region white.")
    level = resize_mask(mask, shape)
    shapes = dict(zip(objective.encoder.names, layer_shapes(objective.encoder, *shape)))
    for layer in sorted(loss.layers, key=lambda name: shapes[name][1] * shapes[name][2]):
        _, height, width = shapes[layer]
        coverage = resize_mask(level, (height, width)).sum().item()
        if coverage < MIN_COVERAGE:
            raise ConfigError(
                f"{where} covers only {coverage:.2g} of the {height}×{width} positions of layer {layer} at the "
                f"{size} px pyramid level (at least {MIN_COVERAGE} are needed for the region's statistics); paint "
                f"a larger white area, use a larger schedule.size (smallest level), or guide shallower layers only."
            )


def load_guides(objective: PerceptualObjective, schedule: Schedule, content_path: Path, device: torch.device) -> None:
    """Read and check every guided loss's region masks and styles (at the largest level's sizes,
    onto ``device``) and hand them to the loss (:meth:`GuidedGramStyleLoss.set_guides`)."""
    smallest = min(level.size for level in schedule.levels)
    content_shape = image_shape(content_path)
    for name, loss in objective.losses.items():
        if not isinstance(loss, GuidedGramStyleLoss):
            continue
        guides = {}
        for region in loss.regions.values():
            guides[region.name] = _load_region(objective, loss, schedule, region, f"loss.{name}.regions.{region.name}",
                                               content_path, content_shape, smallest, device)
        loss.set_guides(guides)


def _load_region(
    objective: PerceptualObjective, loss: GuidedGramStyleLoss, schedule: Schedule, region: Region, where: str,
    content_path: Path, content_shape: tuple[int, int], smallest: int, device: torch.device,
) -> Guide:
    mask_path = Path(region.mask).absolute()
    mask = _read_mask(mask_path, content_path, long_edge_shape(*content_shape, schedule.size), f"{where}.mask")
    check_coverage(objective, loss, mask, long_edge_shape(*content_shape, smallest), f"{where}.mask {str(mask_path)!r}",
                   smallest)
    styles, style_masks = [], []
    for index, (style, style_mask) in enumerate(zip(region.styles, region.style_masks)):
        style_path = Path(style).absolute()
        height, width = image_shape(style_path)
        low = schedule.style_edge(smallest)
        check_encodable(objective, f"{where}.styles[{index}] {str(style_path)!r} ({width}×{height} px) at the "
                        f"{smallest} px pyramid level", *long_edge_shape(height, width, low))
        image = read_image(style_path, schedule.style_edge(schedule.size))
        styles.append(image.to(device))
        if style_mask is None:
            style_masks.append(None)
            continue
        what, path = f"{where}.style_masks[{index}]", Path(style_mask).absolute()
        read = _read_mask(path, style_path, tuple(image.shape[-2:]), what)
        check_coverage(objective, loss, read, long_edge_shape(height, width, low), f"{what} {str(path)!r}", smallest)
        style_masks.append(read.to(device))
    return Guide(mask.to(device), styles, style_masks)


def _read_mask(path: Path, image: Path, shape: tuple[int, int], where: str) -> torch.Tensor:
    try:
        check_aspect(path, image, where)
        return read_mask(path, shape)
    except ImageError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
