"""Perceptual losses for image optimisation (pystiche conventions).

Each loss is an ``nn.Module`` with per-layer weights (``layers``: ``{layer: weight}``) and a
``score_weight`` multiplying its total. Losses that compare encodings with those of a target
image (:class:`ContentLoss`, :class:`GramStyleLoss`, :class:`MRFStyleLoss`) compute their
target representations once in :meth:`EncodingLoss.set_targets` and cache them; each step only
encodes the image being optimised.

Conventions (the same as pystiche 1.0):

* content:  ``mean((F - F_t)²)`` over all ``C·H·W`` elements.
* Gram:     ``G = F Fᵀ / (H·W)`` with ``F`` the ``C×(H·W)`` feature matrix, then
  ``mean((G - G_t)²)`` over the ``C×C`` entries. (Gatys et al. use ``Σ(G-G_t)² / (4C²(HW)²)``
  on un-normalised Grams; that differs by a constant factor absorbed by ``score_weight``.)
* MRF:      each ``k×k`` patch of ``F`` is matched to the target patch of highest normalised
  cross-correlation (Li & Wand 2016); ``mean((P - P_nn)²)`` over all patch elements.
* TV:       ``mean((Δx² + Δy²)^(β/2))`` over the ``(H-1)(W-1)`` pixel positions and channels.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from stx.encoders import MultiLayerEncoder
from stx.errors import ConfigError


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``F Fᵀ / (H·W)`` of ``B×C×H×W`` features, shape ``B×C×C``."""
    # At least fp32, also under autocast: Gram entries of VGG features overflow fp16.
    flat = features.flatten(2)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    with torch.autocast(flat.device.type, enabled=False):
        return torch.bmm(flat, flat.transpose(1, 2)).div_(flat.shape[-1])


class _GramMSE(torch.autograd.Function):
    """``mean((gram_matrix(F) - G_t)²)`` with a hand-written backward.

    Autograd would spend two batched matmuls on the Gram's backward; since
    ``∂L/∂F = (∂L/∂G + ∂L/∂Gᵀ) F / (H·W)`` one suffices, and no Gram graph is kept.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        flat = features.flatten(2)
        diff = torch.baddbmm(target, flat, flat.transpose(1, 2), beta=-1.0, alpha=1.0 / flat.shape[-1])
        ctx.save_for_backward(flat, diff)
        ctx.shape = features.shape
        return diff.square().mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        flat, diff = ctx.saved_tensors
        scale = grad * 2.0 / (diff.numel() * flat.shape[-1])
        symmetric = (diff + diff.transpose(1, 2)).mul_(scale)  # scale the small C×C factor
        return torch.bmm(symmetric, flat).view(ctx.shape), None


def gram_loss(features: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean((G - target)²)`` with ``G = gram_matrix(features)``; ``target`` is ``B×C×C``."""
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    return _GramMSE.apply(features, target.to(features.dtype))


def extract_patches(features: torch.Tensor, size: int, stride: int) -> torch.Tensor:
    """All ``size×size`` patches of ``B×C×H×W`` features as a ``(B·L)×(C·size²)`` matrix."""
    patches = F.unfold(features, kernel_size=size, stride=stride)  # B×(C·k²)×L
    return patches.transpose(1, 2).flatten(0, 1)


def nearest_patches(patches: torch.Tensor, targets: torch.Tensor, normalized_targets: torch.Tensor) -> torch.Tensor:
    """For each row of ``patches``, the row of ``targets`` with the highest cosine similarity."""
    with torch.no_grad():
        similarity = F.normalize(patches, dim=1) @ normalized_targets.T
        return targets[similarity.argmax(dim=1)]


def total_variation(image: torch.Tensor, exponent: float = 2.0) -> torch.Tensor:
    """``mean((Δx² + Δy²)^(exponent/2))`` of a ``B×C×H×W`` image (forward differences)."""
    dy = image[..., 1:, :-1] - image[..., :-1, :-1]
    dx = image[..., :-1, 1:] - image[..., :-1, :-1]
    squared = dx.square() + dy.square()
    if exponent == 2.0:
        return squared.mean()
    return squared.clamp_min(1e-12).pow(exponent / 2.0).mean()


def _check_weight(value: float, what: str) -> float:
    value = float(value)
    if not value >= 0.0 or value == float("inf"):
        raise ConfigError(f"{what}={value!r} is not valid: weights must be finite numbers >= 0.")
    return value


class Loss(nn.Module):
    """A weighted loss term. ``forward(features, image)`` returns ``{layer: value}``.

    ``features`` maps encoder layer names to ``B×C×H×W`` activations of the image being
    optimised; ``image`` is that image (``B×3×H×W``, [0, 1]). The term's contribution to the
    objective is ``score_weight · Σ_layer weight_layer · value_layer``.
    """

    source: ClassVar[str | None] = None
    """Which input image the targets come from: ``"content"``, ``"style"`` or ``None``."""

    def __init__(self, layers: Mapping[str, float], score_weight: float = 1.0) -> None:
        super().__init__()
        self.layer_weights = {str(k): _check_weight(v, f"layer weight {k}") for k, v in layers.items()}
        self.score_weight = _check_weight(score_weight, "score_weight")

    @property
    def layers(self) -> frozenset[str]:
        return frozenset(self.layer_weights)

    def weighted(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """``score_weight · Σ weight_layer · value_layer``."""
        return self.score_weight * sum(self.layer_weights[k] * v for k, v in values.items())


class EncodingLoss(Loss):
    """A loss comparing encodings of the image with cached representations of target images."""

    def __init__(self, layers: Mapping[str, float], score_weight: float = 1.0) -> None:
        super().__init__(layers, score_weight)
        if not self.layer_weights:
            raise ConfigError(f"{type(self).__name__} needs at least one layer, e.g. {{relu4_2: 1.0}}.")
        self.targets: dict[str, object] = {}

    def represent(self, features: torch.Tensor) -> torch.Tensor:
        """A target image's representation at one layer (its features by default)."""
        return features

    def blend(self, representations: Sequence[torch.Tensor], weights: Sequence[float]) -> object:
        """Combine the representations of several target images (weights sum to one)."""
        return sum(w * r for w, r in zip(weights, representations))

    @torch.no_grad()
    def set_targets(self, encoder: MultiLayerEncoder, images: Sequence[torch.Tensor], weights: Sequence[float]) -> None:
        """Encode the target images once and cache their blended representations."""
        total = sum(weights)
        weights = [w / total for w in weights]
        encodings = [encoder(image, self.layers) for image in images]
        self.targets = {
            layer: self.blend([self.represent(e[layer]) for e in encodings], weights) for layer in self.layers
        }

    def layer_loss(self, features: torch.Tensor, target: object) -> torch.Tensor:
        """The loss of the image's ``features`` at one layer against the cached ``target``."""
        return F.mse_loss(features, target)

    def forward(self, features: Mapping[str, torch.Tensor], image: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.targets:
            raise RuntimeError(f"{type(self).__name__}.set_targets() must be called before use")
        return {layer: self.layer_loss(features[layer], self.targets[layer]) for layer in self.layer_weights}


class ContentLoss(EncodingLoss):
    """Feature reconstruction loss against the content image: ``mean((F - F_t)²)``."""

    source = "content"


class GramStyleLoss(EncodingLoss):
    """Gram-matrix style loss (Gatys et al. 2016): ``mean((G - G_t)²)``, ``G = FFᵀ/(H·W)``.

    Several style images are blended by averaging their Gram matrices with the blend weights.
    """

    source = "style"

    def represent(self, features: torch.Tensor) -> torch.Tensor:
        return gram_matrix(features)

    def layer_loss(self, features: torch.Tensor, target: object) -> torch.Tensor:
        return gram_loss(features, target)


class MRFStyleLoss(EncodingLoss):
    """Markov-random-field patch loss (Li & Wand 2016).

    Each ``patch_size×patch_size`` patch of the image's features (stride ``stride``) is matched
    to the style patch (stride ``target_stride``) with the highest normalised cross-correlation,
    and the loss is ``mean((P - P_nn)²)``. With several style images the loss is the weighted
    sum of the per-image losses.
    """

    source = "style"

    def __init__(
        self,
        layers: Mapping[str, float],
        score_weight: float = 1.0,
        patch_size: int = 3,
        stride: int = 1,
        target_stride: int = 1,
    ) -> None:
        super().__init__(layers, score_weight)
        for name, value in (("patch_size", patch_size), ("stride", stride), ("target_stride", target_stride)):
            if int(value) < 1:
                raise ConfigError(f"MRF {name}={value!r} is not valid: use a whole number >= 1.")
        self.patch_size, self.stride, self.target_stride = int(patch_size), int(stride), int(target_stride)

    def represent(self, features: torch.Tensor) -> torch.Tensor:
        return extract_patches(features, self.patch_size, self.target_stride)

    def blend(self, representations: Sequence[torch.Tensor], weights: Sequence[float]) -> object:
        """Patch sets are not averaged: each style keeps its own, with its weight."""
        return [(w, patches, F.normalize(patches, dim=1)) for w, patches in zip(weights, representations)]

    def layer_loss(self, features: torch.Tensor, target: object) -> torch.Tensor:
        patches = extract_patches(features, self.patch_size, self.stride)
        return sum(w * F.mse_loss(patches, nearest_patches(patches, p, n)) for w, p, n in target)


class TotalVariationLoss(Loss):
    """Total variation regulariser on the image itself; see :func:`total_variation`."""

    def __init__(self, score_weight: float = 1.0, exponent: float = 2.0) -> None:
        super().__init__({}, score_weight)
        if not float(exponent) > 0.0:
            raise ConfigError(f"total variation exponent={exponent!r} is not valid: use a number > 0.")
        self.exponent = float(exponent)

    def weighted(self, values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        return self.score_weight * values["image"]

    def forward(self, features: Mapping[str, torch.Tensor], image: torch.Tensor) -> dict[str, torch.Tensor]:
        return {"image": total_variation(image, self.exponent)}


class PerceptualObjective(nn.Module):
    """The full objective: one encoder pass per evaluation feeds every named loss term.

    ``forward(image)`` returns ``(total, values)`` where ``values`` holds, for each loss named
    ``n``, the unweighted per-layer values ``"n/layer"`` and the weighted term ``"n"``; the
    total is the sum of the weighted terms.
    """

    def __init__(self, encoder: MultiLayerEncoder | None, losses: Mapping[str, Loss]) -> None:
        super().__init__()
        if not losses:
            raise ConfigError("the loss set is empty: configure at least one loss term.")
        self.encoder = encoder
        self.losses = nn.ModuleDict(losses)
        self.layers = frozenset().union(*(loss.layers for loss in self.losses.values()))

    def set_targets(
        self, content: torch.Tensor, styles: Sequence[torch.Tensor], style_weights: Sequence[float]
    ) -> None:
        """Compute and cache every loss's target representations (once per image size)."""
        for loss in self.losses.values():
            if loss.source == "content":
                loss.set_targets(self.encoder, [content], [1.0])
            elif loss.source == "style":
                loss.set_targets(self.encoder, styles, style_weights)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        features = self.encoder(image, self.layers) if self.layers else {}
        values: dict[str, torch.Tensor] = {}
        total = image.new_zeros(())
        for name, loss in self.losses.items():
            per_layer = loss(features, image)
            weighted = loss.weighted(per_layer)
            total = total + weighted
            values.update({f"{name}/{layer}": value for layer, value in per_layer.items()})
            values[name] = weighted
        return total, values
