"""Exact tiled evaluation of the objective, for images whose encoder activations do not fit in
memory at once (``schedule.tile``).

Each tileable loss is a function of sums over the positions of each layer it reads: the Gram
loss of ``Σ f fᵀ``, the content loss of ``Σ (f - f_t)²``, the mean–std loss of ``Σ f`` and
``Σ f²`` (see :class:`~stx.engine.losses.EncodingLoss.position_sums`). So the objective and its exact
gradient can be computed tile by tile, in two passes over the image:

1. each tile is encoded without gradients and the sums over the positions it owns are added up;
   from the totals follow every loss value and the gradient of the total with respect to the sums;
2. each tile is encoded again and the sums over its own positions, weighted by that gradient
   (the total is linear in them to first order, which is all a gradient needs), are
   back-propagated to its pixels and added into the image's gradient.

A tile is encoded with a halo of neighbouring pixels as wide as the deepest layer's receptive
field reaches, and tiles start on multiples of the encoder's total stride, so the features at
a tile's own positions equal the whole image's exactly: the tiled objective and gradient equal
the untiled ones to float rounding, and there are no seams. The price is one more forward
pass per evaluation plus the halos' overlap. Losses on the image itself (total variation) are
computed on the whole image as usual.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from stx.engine.encoders import MultiLayerEncoder, pair
from stx.engine.losses import EncodingLoss, PerceptualObjective
from stx.errors import ConfigError

LOCAL_MODULES = (nn.ReLU, nn.BatchNorm2d, nn.Identity, nn.Dropout)
"""Modules that act on each position on its own (in eval mode)."""
WINDOW_MODULES = (nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)


@dataclass(frozen=True)
class Reach:
    """How far features reach into the input, in input pixels: a feature at position ``i`` of
    a layer with stride ``jumps[layer]`` depends on input pixels ``i·jump - before`` to
    ``i·jump + after`` at most; tiles must start on multiples of ``align``."""

    before: int
    after: int
    jumps: dict[str, int]
    align: int


def encoder_reach(encoder: MultiLayerEncoder, where: str = "schedule.tile") -> Reach:
    """The :class:`Reach` of an encoder's stack (up to its deepest layer); raises
    :class:`ConfigError` for a stack that mixes distant positions (it cannot be tiled)."""
    if getattr(encoder, "softmax", None):
        raise ConfigError(f"{where} cannot tile an encoder with the softmax transform (it normalises over whole "
                          f"feature maps); use {where}=off or encoder.softmax=null.")
    before = after = 0
    jump, jumps = 1, {}
    for name, module in zip(encoder.names, encoder.features):
        if isinstance(module, WINDOW_MODULES):
            if getattr(module, "ceil_mode", False):
                raise ConfigError(f"{where} cannot tile a pooling layer with ceil_mode (layer {name}).")
            kernel, stride = max(pair(module.kernel_size)), max(pair(module.stride))
            padding, dilation = max(pair(module.padding)), max(pair(getattr(module, "dilation", 1)))
            before += padding * jump
            after += (dilation * (kernel - 1) - padding) * jump
            jump *= stride
        elif not isinstance(module, LOCAL_MODULES):
            raise ConfigError(
                f"{where} needs an encoder made of convolutions, poolings and activations, but layer {name} "
                f"is a {type(module).__name__}, which is not tiled here; use {where}=off, or a VGG or AlexNet encoder."
            )
        jumps[name] = jump
    return Reach(before, after, jumps, jump)


@dataclass(frozen=True)
class Tile:
    """Input rows ``[top, bottom)`` and columns ``[left, right)`` encoded for a tile (halo
    included), and the pixels it owns, ``own_rows`` × ``own_cols`` (``[start, stop)`` each)."""

    top: int
    bottom: int
    left: int
    right: int
    own_rows: tuple[int, int]
    own_cols: tuple[int, int]


def _spans(length: int, tile: int, before: int, after: int) -> list[tuple[int, int, int, int]]:
    return [(max(0, start - before), min(length, start + tile + after), start, min(length, start + tile))
            for start in range(0, length, tile)]


def tile_grid(height: int, width: int, tile: int, reach: Reach) -> list[Tile]:
    """Tiles of ``tile`` px (a multiple of ``reach.align``) covering an ``H×W`` image."""
    before = math.ceil(reach.before / reach.align) * reach.align  # tiles start aligned
    return [Tile(top, bottom, left, right, (row0, row1), (col0, col1))
            for top, bottom, row0, row1 in _spans(height, tile, before, reach.after)
            for left, right, col0, col1 in _spans(width, tile, before, reach.after)]


def _own(span: tuple[int, int], start: int, length: int, jump: int, features: int) -> slice:
    """The feature positions of a layer (stride ``jump``, ``features`` positions for the whole
    image of ``length`` px) owned by the pixels ``span``, relative to a tile starting at ``start``."""
    first = span[0] // jump
    last = span[1] // jump if span[1] < length else features
    return slice(first - start // jump, last - start // jump)


def check_tileable(objective: PerceptualObjective, where: str = "schedule.tile", tile: int | None = None) -> Reach:
    """The encoder's :class:`Reach`, after checking that every loss reading it can be tiled and,
    given a ``tile`` edge (px), that it is a positive multiple of the encoder's total stride."""
    for name, loss in objective.losses.items():
        if loss.layers and not (isinstance(loss, EncodingLoss) and loss.tileable()):
            raise ConfigError(
                f"{where} cannot tile loss.{name} ({type(loss).__name__}): it is not a function of sums over "
                f"feature positions. Tileable terms: content, Gram and mean–std losses without "
                f"normalize_gradients, and total variation; use {where}=off for this loss set."
            )
    reach = encoder_reach(objective.encoder, where)
    if tile is not None and (tile <= 0 or tile % reach.align):
        raise ConfigError(f"schedule.tile={tile} is not valid: use a multiple of {reach.align} px "
                          f"(the encoder's total stride), or auto or off.")
    return reach


@dataclass(frozen=True)
class Piece:
    """One tile's encoding: the tile's input pixels (with the gradient flag asked for) and, per
    layer, the features at the positions the tile owns and where they sit in the whole
    image's feature map (``rows``, ``cols``)."""

    tile: Tile
    pixels: torch.Tensor
    features: dict[str, torch.Tensor]
    windows: dict[str, tuple[slice, slice]]


class TiledObjective(nn.Module):
    """A :class:`~stx.engine.losses.PerceptualObjective` evaluated tile by tile (see the module's
    docstring): the same ``set_targets`` and ``forward(image) -> (total, values)``, with the
    same values and gradient, in memory bounded by a ``tile×tile`` px tile and its halo.
    Images that fit in one tile are evaluated untiled."""

    def __init__(self, objective: PerceptualObjective, tile: int) -> None:
        super().__init__()
        self.objective = objective
        self.reach = check_tileable(objective, tile=tile)
        self.tile = tile
        self.layers = objective.layers

    @property
    def encoder(self) -> MultiLayerEncoder:
        return self.objective.encoder

    @property
    def losses(self) -> nn.ModuleDict:
        return self.objective.losses

    def _encoding(self) -> dict[str, EncodingLoss]:
        return {name: loss for name, loss in self.losses.items() if loss.layers}

    def _fits(self, *images: torch.Tensor) -> bool:
        return all(max(image.shape[-2:]) <= self.tile for image in images)

    def pieces(self, image: torch.Tensor, *, grad: bool):
        """The :class:`Piece` of each tile of ``image``, encoded with or without gradients."""
        height, width = image.shape[-2:]
        shapes = self.encoder.layer_shapes(height, width)
        for tile in tile_grid(height, width, self.tile, self.reach):
            pixels = image[..., tile.top:tile.bottom, tile.left:tile.right].detach()
            pixels.requires_grad_(grad)
            with torch.set_grad_enabled(grad):
                encoded = self.encoder(pixels, self.layers)
            features, windows = {}, {}
            for layer, value in encoded.items():
                jump, (_, rows, cols) = self.reach.jumps[layer], shapes[layer]
                local = (_own(tile.own_rows, tile.top, height, jump, rows), _own(tile.own_cols, tile.left, width, jump, cols))
                features[layer] = value[..., local[0], local[1]]
                windows[layer] = tuple(slice(part.start + start // jump, part.stop + start // jump)
                                       for part, start in zip(local, (tile.top, tile.left)))
            yield Piece(tile, pixels, features, windows)

    @torch.no_grad()
    def _representation(self, loss: EncodingLoss, image: torch.Tensor) -> dict[str, object]:
        """One target image's representation at each of ``loss``'s layers, tile by tile: the
        whole feature map for a positional loss, else from the sums over all positions."""
        shapes = self.encoder.layer_shapes(*image.shape[-2:])
        if loss.positional:
            maps = {layer: image.new_empty(1, *shapes[layer]) for layer in loss.layers}
            for piece in self.pieces(image, grad=False):
                for layer in loss.layers:
                    maps[layer][..., piece.windows[layer][0], piece.windows[layer][1]] = piece.features[layer]
            return {layer: loss.represent(value) for layer, value in maps.items()}
        sums: dict[str, torch.Tensor] = {}
        for piece in self.pieces(image, grad=False):
            for layer in loss.layers:
                part = loss.position_sums(piece.features[layer])
                sums[layer] = part if layer not in sums else sums[layer] + part
        return {layer: loss.represent_from_sums(value, shapes[layer][1] * shapes[layer][2])
                for layer, value in sums.items()}

    @torch.no_grad()
    def set_targets(self, content: torch.Tensor, styles: Sequence[torch.Tensor], style_weights: Sequence[float]) -> None:
        """Every loss's targets, as :meth:`PerceptualObjective.set_targets` computes them."""
        if self._fits(content, *styles):
            self.objective.set_targets(content, styles, style_weights)
            return
        total = sum(style_weights)
        for loss in self._encoding().values():
            images, weights = ([content], [1.0]) if loss.source == "content" else (styles, [w / total for w in style_weights])
            representations = [self._representation(loss, image) for image in images]
            loss.use_targets({layer: loss.blend([r[layer] for r in representations], weights) for layer in loss.layers})

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, values)`` as :class:`PerceptualObjective` returns them; when gradients are
        enabled and ``image`` requires one, ``total.backward()`` gives the exact gradient."""
        if self._fits(image):
            return self.objective(image)
        encoding = self._encoding()
        shapes = self.encoder.layer_shapes(*image.shape[-2:])
        keys = [(name, layer) for name, loss in encoding.items() for layer in loss.layers]

        def sums_of(piece: Piece) -> dict[tuple[str, str], torch.Tensor]:
            out = {}
            for name, layer in keys:
                loss, window = encoding[name], piece.windows[layer]
                target = loss.targets[layer][..., window[0], window[1]] if loss.positional else None
                out[name, layer] = loss.position_sums(piece.features[layer], target)
            return out

        totals: dict[tuple[str, str], torch.Tensor] = {}
        for piece in self.pieces(image, grad=False):  # pass 1: the sums
            for key, part in sums_of(piece).items():
                totals[key] = part if key not in totals else totals[key] + part
        leaves = {key: value.detach().requires_grad_(True) for key, value in totals.items()}
        values: dict[str, torch.Tensor] = {}
        total = image.new_zeros(())
        wants_gradient = torch.is_grad_enabled() and image.requires_grad
        with torch.enable_grad():
            encoded_total = image.new_zeros(())
            for name, loss in self.losses.items():
                if name in encoding:
                    per_layer = {layer: loss.relative_value(layer, loss.from_position_sums(
                                     leaves[name, layer], loss.targets[layer], shapes[layer][1] * shapes[layer][2]))
                                 for layer in loss.layers}
                    weighted = loss.weighted(per_layer)
                    encoded_total = encoded_total + weighted
                else:  # a loss on the image itself
                    per_layer = loss({}, image)
                    weighted = loss.weighted(per_layer)
                    total = total + weighted
                values.update({f"{name}/{layer}": value.detach() for layer, value in per_layer.items()})
                values[name] = weighted.detach()
            slopes = torch.autograd.grad(encoded_total, list(leaves.values())) if wants_gradient else ()
        if not wants_gradient:
            return total.detach() + encoded_total.detach(), values
        slope = dict(zip(leaves, slopes))
        gradient = torch.zeros_like(image)
        for piece in self.pieces(image, grad=True):  # pass 2: back-propagate the sums' slopes
            linear = sum((slope[key] * part).sum() for key, part in sums_of(piece).items())
            (tile_gradient,) = torch.autograd.grad(linear, piece.pixels)
            t = piece.tile
            gradient[..., t.top:t.bottom, t.left:t.right] += tile_gradient
        # The value of the encoding terms with the gradient just computed: (image·g) - (image·g) is 0.
        surrogate = (image * gradient).sum() - (image.detach() * gradient).sum()
        return total + encoded_total.detach() + surrogate, values
