"""A job's input files — content, styles, init image, guided losses' masks and region styles — checked
and read once, in two steps:

1. :func:`check_files` reads only the files' headers: every content and style image must survive
   the encoder at the smallest pyramid level (:func:`check_encodable`), and the peak bytes of
   decoding the largest of them are computed (:func:`decode_bytes`) for the memory plan
   (:mod:`stx.engine.plan`), which is made before anything is decoded;
2. :meth:`InputFiles.read` decodes them onto the device, once each, with the judge's references,
   and hands guided losses their regions (:meth:`~stx.engine.losses.GuidedGramStyleLoss.set_guides`).

A mask is refused when it cannot be read, when its aspect ratio differs from the image it guides
(content or style), when it is all black, or when it covers less than half a position of a guided
layer at the smallest pyramid level (its Gram would be that of nothing, or of a sliver of one position).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from stx.engine.image import image_shape, long_edge_shape, read_image, read_mask, reduction_factor, resize_mask
from stx.engine.losses import Guide, GuidedGramStyleLoss, MRFStyleLoss, PerceptualObjective, Region
from stx.engine.optim import Schedule
from stx.errors import ConfigError, ImageError

DECODED_BYTES_PER_PIXEL = 8
"""Peak bytes per pixel of an input file while :func:`stx.engine.image.read_image` decodes it: Pillow's
image and one converted copy (measured on the CPU: RGB 4.4, palette 5, 16-bit grey 6, RGBA 8, CMYK 8)."""
WORKING_BYTES_PER_PIXEL = 16
"""Bytes per pixel of the (reduced) copy it turns into a float tensor (measured: an unreduced
RGB file peaks at 20 = 4 + 16)."""
ASPECT_TOLERANCE = 0.01
"""Largest relative difference of width/height between a mask and the image it guides."""
MIN_COVERAGE = 0.5
"""Least total mask weight (positions, each weighted by its mask value in [0, 1]) a region must
have at every guided layer at the smallest pyramid level."""


@dataclass(frozen=True)
class Inputs:
    """The decoded inputs on the job's device, ``1×3×H×W`` in [0, 1]: ``content`` at the largest
    level's size, ``styles`` at its style size, ``initial`` (``schedule.init_image``) at the
    content's size or None, and ``references`` (content, then styles) at the judge's size (none
    when not asked for)."""

    content: torch.Tensor
    styles: list[torch.Tensor]
    initial: torch.Tensor | None
    references: list[torch.Tensor]


@dataclass(frozen=True)
class InputFiles:
    """A job's input files after :func:`check_files`: absolute paths, the content file's
    ``(H, W)``, the content's ``(H, W)`` at the largest level (``schedule.size``) and the peak
    bytes of decoding the largest input at that level."""

    content: Path
    styles: list[Path]
    init: Path | None
    content_shape: tuple[int, int]
    shape: tuple[int, int]
    decoding: int

    def read(self, objective: PerceptualObjective, schedule: Schedule, device: torch.device,
             reference_size: int | None) -> Inputs:
        """Decode every file once onto ``device`` (see :class:`Inputs`; the references only with a
        ``reference_size``), and read and check the guided losses' regions and hand them to their losses."""
        for name, loss in objective.losses.items():
            if isinstance(loss, GuidedGramStyleLoss):
                loss.set_guides({region.name: read_region(objective, loss, schedule, region,
                                                          f"loss.{name}.regions.{region.name}", self, device)
                                 for region in loss.regions.values()})
        style_size = schedule.style_edge(schedule.size)
        initial = None if self.init is None else read_image(self.init, schedule.size).to(device)
        return Inputs(read_image(self.content, schedule.size).to(device),
                      [read_image(path, style_size).to(device) for path in self.styles], initial,
                      [] if reference_size is None else
                      [read_image(path, reference_size).to(device) for path in (self.content, *self.styles)])


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


def check_files(objective: PerceptualObjective, schedule: Schedule, content: Path, styles: Sequence[Path],
                init: Path | None = None) -> InputFiles:
    """Check, from their headers, that the content and style images survive the encoder at the
    smallest pyramid level (:func:`check_encodable`) and that the init image can be opened;
    nothing is decoded."""
    smallest = min(level.size for level in schedule.levels)
    style_edges = schedule.style_edge(smallest), schedule.style_edge(schedule.size)
    checks = [("images.content", content, smallest, schedule.size), *(("images.styles", path, *style_edges) for path in styles)]
    decoding, shapes = 0, []
    for key, path, low, high in checks:
        height, width = image_shape(path)
        what = f"{key} {str(path)!r} ({width}×{height} px) at the {low} px pyramid level"
        check_encodable(objective, what, *long_edge_shape(height, width, low))
        decoding = max(decoding, decode_bytes(height, width, high))
        shapes.append((height, width))
    if init is not None:
        decoding = max(decoding, decode_bytes(*image_shape(init), schedule.size))
    return InputFiles(content, list(styles), init, shapes[0], long_edge_shape(*shapes[0], schedule.size), decoding)


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
    shapes = objective.encoder.layer_shapes(*shape)
    for layer in sorted(loss.layers, key=lambda name: shapes[name][1] * shapes[name][2]):
        _, height, width = shapes[layer]
        coverage = resize_mask(level, (height, width)).sum().item()
        if coverage < MIN_COVERAGE:
            raise ConfigError(
                f"{where} covers only {coverage:.2g} of the {height}×{width} positions of layer {layer} at the "
                f"{size} px pyramid level (at least {MIN_COVERAGE} are needed for the region's statistics); paint "
                f"a larger white area, use a larger schedule.size (smallest level), or guide shallower layers only."
            )


def read_region(objective: PerceptualObjective, loss: GuidedGramStyleLoss, schedule: Schedule, region: Region,
                where: str, files: InputFiles, device: torch.device) -> Guide:
    """A guided loss's region, read and checked: its mask (on the content) at the largest level,
    its styles at the largest level's style size and their masks, on ``device``."""
    smallest = min(level.size for level in schedule.levels)
    mask_path = Path(region.mask).absolute()
    mask = _read_mask(mask_path, files.content, long_edge_shape(*files.content_shape, schedule.size), f"{where}.mask")
    check_coverage(objective, loss, mask, long_edge_shape(*files.content_shape, smallest),
                   f"{where}.mask {str(mask_path)!r}", smallest)
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
