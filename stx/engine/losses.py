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
* mean–std: channel means ``μ`` and standard deviations ``σ = √(var + 1e-5)`` over the ``H·W``
  positions (AdaIN's statistics; population variance), ``mean((μ-μ_t)²) + mean((σ-σ_t)²)`` over
  the ``C`` channels.
* W2:       the squared 2-Wasserstein distance between the Gaussians with the features' channel
  means and covariances ``Σ = (F-μ)(F-μ)ᵀ/(H·W)``, divided by ``C`` (a per-channel figure, so
  that layers of different widths are comparable):
  ``(‖μ-μ_t‖² + tr(Σ + Σ_t - 2(Σ_t^½ Σ Σ_t^½)^½)) / C``.
* guided Gram: per region ``r`` with mask ``m`` (resized to the layer, values in [0, 1]),
  ``G_r = (F·m)(F·m)ᵀ / Σm²`` (the Gram of the masked positions; a uniform mask gives the plain
  Gram), loss ``Σ_r w_r · mean((G_r - G_r,t)²)``.

Several style images are blended by the moments of their weighted mixture: Gram targets average
the Grams (second moments); mean–std and W2 targets take the mixture's mean and variance or
covariance, ``μ = Σ wᵢμᵢ``, ``Σ = Σ wᵢ(Σᵢ + (μᵢ-μ)(μᵢ-μ)ᵀ)``: the Gaussian fitted to the pooled
features, not the Wasserstein barycentre of the styles' Gaussians.

``relative`` divides each layer value by the value all-zero features would score against the same
target (content: ``mean(F_t²)``, Gram: ``mean(G_t²)``, mean–std: ``mean(μ_t²) + mean(σ_t²)``, W2:
``(‖μ_t‖² + tr Σ_t) / C``, MRF: the style patches' ``mean(P²)``): the layer values become squared
relative distances (the content's is the judge's ``content_distance²`` at that layer, the Gram's its
``style_distance²``), the same whatever the network's activation scale and the style image's
contrast, so one score weight means the same on every encoder and image. A constant per target,
it leaves each term's minimiser unchanged.

``normalize_gradients`` (neural-style's ``-normalize_gradients``) rescales, at each layer, the
gradient of the unweighted layer value with respect to the features to unit L1 norm, before the
layer and score weights multiply it; the value itself is unchanged.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from stx.engine.encoders import MultiLayerEncoder
from stx.engine.image import resize, resize_mask
from stx.errors import ConfigError


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """Gram matrix ``F Fᵀ / (H·W)`` of ``B×C×H×W`` features, shape ``B×C×C``."""
    # At least fp32, also under autocast: Gram entries of VGG features overflow fp16.
    flat = features.flatten(2)
    flat = flat.to(torch.promote_types(flat.dtype, torch.float32))
    with torch.autocast(flat.device.type, enabled=False):
        return torch.bmm(flat, flat.transpose(1, 2)).div_(flat.shape[-1])


class _GramMSE(torch.autograd.Function):
    """``mean((gram_matrix(F) - G_t)²)`` with a hand-written backward: over every entry, or with
    ``per_sample`` over each sample's ``C×C`` entries (``B`` values).

    Autograd would spend two batched matmuls on the Gram's backward; since
    ``∂L/∂F = (∂L/∂G + ∂L/∂Gᵀ) F / (H·W)`` one suffices, and no Gram graph is kept.
    """

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda", cast_inputs=torch.float32)
    def forward(ctx, features: torch.Tensor, target: torch.Tensor, per_sample: bool) -> torch.Tensor:
        flat = features.flatten(2)
        diff = torch.baddbmm(target, flat, flat.transpose(1, 2), beta=-1.0, alpha=1.0 / flat.shape[-1])
        ctx.save_for_backward(flat, diff)
        ctx.shape, ctx.per_sample = features.shape, per_sample
        return diff.square().flatten(1).mean(1) if per_sample else diff.square().mean()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None, None]:
        flat, diff = ctx.saved_tensors
        entries = diff[0].numel() if ctx.per_sample else diff.numel()
        scale = grad.reshape(-1, 1, 1) * 2.0 / (entries * flat.shape[-1])
        symmetric = (diff + diff.transpose(1, 2)).mul_(scale)  # scale the small C×C factor
        return torch.bmm(symmetric, flat).view(ctx.shape), None, None


def gram_loss(features: torch.Tensor, target: torch.Tensor, per_sample: bool = False) -> torch.Tensor:
    """``mean((G - target)²)`` with ``G = gram_matrix(features)``; ``target`` is ``B×C×C`` (or
    ``1×C×C``); ``per_sample``: one mean per sample, ``B`` values."""
    if features.dtype in (torch.float16, torch.bfloat16):
        features = features.float()
    return _GramMSE.apply(features, target.to(features.dtype), per_sample)


def _float_flat(features: torch.Tensor) -> torch.Tensor:
    """``B×C×H×W`` features as ``B×C×(H·W)``, at least fp32 (moments of VGG features overflow fp16)."""
    flat = features.flatten(2)
    return flat.to(torch.promote_types(flat.dtype, torch.float32))


MEANSTD_EPS = 1e-5
"""Added to the variance under the square root (feature² units): a finite gradient at σ = 0."""


def channel_moments(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel means and population variances over ``H·W`` of ``B×C×H×W`` features (``B×C`` each)."""
    flat = _float_flat(features)
    with torch.autocast(flat.device.type, enabled=False):
        return flat.mean(dim=2), flat.var(dim=2, unbiased=False)


def channel_covariance(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Channel means ``B×C`` and covariance ``(F-μ)(F-μ)ᵀ/(H·W)``, ``B×C×C``, of ``B×C×H×W`` features."""
    flat = _float_flat(features)
    with torch.autocast(flat.device.type, enabled=False):
        mean = flat.mean(dim=2)
        centred = flat - mean.unsqueeze(2)
        return mean, torch.bmm(centred, centred.transpose(1, 2)).div_(flat.shape[-1])


def mixture_moments(
    moments: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and (co)variance of the weighted mixture of distributions given by ``(μ, var)`` or
    ``(μ, Σ)`` pairs (``B×C`` and ``B×C`` or ``B×C×C``); ``weights`` sum to one."""
    mean = sum(w * m for w, (m, _) in zip(weights, moments))
    spread = []
    for w, (m, v) in zip(weights, moments):
        d = m - mean
        spread.append(w * (v + (d.square() if v.dim() == 2 else d.unsqueeze(2) * d.unsqueeze(1))))
    return mean, sum(spread)


def _round_off(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Whether each of ``B×C`` eigenvalues is below the round-off of a ``C×C`` matrix in
    ``dtype`` (``C · ε · λ_max``): numerically zero."""
    return values <= values.amax(dim=1, keepdim=True).clamp_min(0) * values.shape[1] * torch.finfo(dtype).eps


def symmetric_sqrt(matrix: torch.Tensor) -> torch.Tensor:
    """Principal square root of symmetric positive semi-definite ``B×C×C`` matrices (float64
    eigendecomposition). Eigenvalues below the round-off of ``matrix``'s dtype count as 0 (left
    in, their square roots would fill a rank-deficient covariance with denormal numbers, which
    slow CPU arithmetic a thousandfold)."""
    values, vectors = torch.linalg.eigh(((matrix + matrix.transpose(1, 2)) / 2).double())
    roots = torch.where(_round_off(values, matrix.dtype), torch.zeros_like(values), values.clamp_min(0).sqrt())
    return ((vectors * roots.unsqueeze(1)) @ vectors.transpose(1, 2)).to(matrix.dtype)


class _NuclearNorm(torch.autograd.Function):
    """``tr((A Aᵀ)^½)`` of ``B×C×N`` matrices (the sum of A's singular values), from the
    eigenvalues of the smaller of ``A Aᵀ`` (``C×C``) and ``Aᵀ A`` (``N×N``), which share them.

    The gradient ``(A Aᵀ)^-½ A = A (Aᵀ A)^-½`` (``U Vᵀ`` of A's SVD) has unit operator norm,
    unlike that of a matrix square root (``½ M^-½``, unbounded as eigenvalues approach 0):
    directions whose eigenvalue is below round-off get none.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor) -> torch.Tensor:
        ctx.wide = a.shape[2] < a.shape[1]  # fewer positions than channels: use the N×N side
        product = torch.bmm(a.transpose(1, 2), a) if ctx.wide else torch.bmm(a, a.transpose(1, 2))
        values, vectors = torch.linalg.eigh((product + product.transpose(1, 2)) / 2)
        kept = ~_round_off(values, values.dtype)
        roots = torch.where(kept, values, torch.ones_like(values)).sqrt()
        ctx.save_for_backward(a, vectors, torch.where(kept, roots.reciprocal(), torch.zeros_like(roots)))
        return torch.where(kept, roots, torch.zeros_like(roots)).sum()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        a, vectors, inverse_roots = ctx.saved_tensors
        projector = (vectors * (grad * inverse_roots).unsqueeze(1)) @ vectors.transpose(1, 2)
        return torch.bmm(a, projector) if ctx.wide else torch.bmm(projector, a)


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
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{what}={value!r} is not valid: weights must be finite numbers >= 0.") from None
    if not value >= 0.0 or value == float("inf"):
        raise ConfigError(f"{what}={value!r} is not valid: weights must be finite numbers >= 0.")
    return value


GRADIENT_EPS = 1e-8
"""Added to the L1 norm by which ``normalize_gradients`` divides a layer's gradient (neural-style's)."""


class _L1NormalizedGradient(torch.autograd.Function):
    """``value(features)`` in the forward pass; in the backward pass the gradient of ``value``
    with respect to ``features`` divided by its L1 norm (+ :data:`GRADIENT_EPS`), times the
    incoming scalar gradient (the layer and score weights)."""

    @staticmethod
    def forward(ctx, features: torch.Tensor, value: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        with torch.enable_grad():
            leaf = features.detach().requires_grad_(True)
            result = value(leaf)
            (gradient,) = torch.autograd.grad(result, leaf)
        ctx.save_for_backward(gradient.div_(gradient.abs().sum() + GRADIENT_EPS))
        return result.detach()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        (normalized,) = ctx.saved_tensors
        return normalized * grad, None


class Loss(nn.Module):
    """A weighted loss term. ``forward(features, image)`` returns ``{layer: value}``.

    ``features`` maps encoder layer names to ``B×C×H×W`` activations of the image being
    optimised; ``image`` is that image (``B×3×H×W``, [0, 1]). The term's contribution to the
    objective is ``score_weight · Σ_layer weight_layer · value_layer``.
    """

    source: ClassVar[str | None] = None
    """Which input image the targets come from: ``"content"``, ``"style"``, ``"regions"`` (each
    region's own styles, :class:`GuidedGramStyleLoss`) or ``None``."""

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

    def working_floats(self, shapes: Mapping[str, tuple[int, int, int]]) -> int:
        """Floats this term keeps per evaluation beyond the encoder's activations, given each
        layer's ``(C, H, W)`` at the largest level (for the memory estimate)."""
        return 0


class EncodingLoss(Loss):
    """A loss comparing encodings of the image with cached representations of target images.

    ``relative``: each layer value is divided by :meth:`zero_value` of its target (see the module's
    docstring); :attr:`scales` holds the divisors' reciprocals once the targets are set."""

    def __init__(
        self, layers: Mapping[str, float], score_weight: float = 1.0, normalize_gradients: bool = False,
        relative: bool = False,
    ) -> None:
        super().__init__(layers, score_weight)
        if not self.layer_weights:
            raise ConfigError(f"{type(self).__name__} needs at least one layer, e.g. {{relu4_2: 1.0}}.")
        for key, value in (("normalize_gradients", normalize_gradients), ("relative", relative)):
            if not isinstance(value, bool):
                raise ConfigError(f"{key}={value!r} is not valid: use true or false.")
        self.normalize_gradients = normalize_gradients
        self.relative = relative
        self.targets: dict[str, object] = {}
        self.scales: dict[str, float] = {}

    def use_targets(self, targets: dict[str, object]) -> None:
        """Cache ``targets`` (``{layer: representation}``) and, when :attr:`relative`, their :attr:`scales`."""
        self.targets = targets
        if self.relative:
            tiny = torch.finfo(torch.float32).tiny
            self.scales = {layer: 1.0 / max(float(self.zero_value(target)), tiny) for layer, target in targets.items()}

    def zero_value(self, target: object) -> torch.Tensor:
        """The layer value of all-zero features against ``target``: its magnitude in this loss's units."""
        return target.to(torch.promote_types(target.dtype, torch.float32)).square().mean()

    def relative_value(self, layer: str, value: torch.Tensor) -> torch.Tensor:
        """``value`` of ``layer`` divided by its target's :meth:`zero_value` when :attr:`relative`."""
        return value * self.scales[layer] if self.relative else value

    def working_floats(self, shapes: Mapping[str, tuple[int, int, int]]) -> int:
        """With ``normalize_gradients``, one normalised gradient per layer, kept for the backward."""
        return sum(math.prod(shapes[layer]) for layer in self.layers) if self.normalize_gradients else 0

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
        self.use_targets(
            {layer: self.blend([self.represent(e[layer]) for e in encodings], weights) for layer in self.layers})

    def layer_loss(self, features: torch.Tensor, target: object) -> torch.Tensor:
        """The loss of the image's ``features`` at one layer against the cached ``target``."""
        return F.mse_loss(features, target)

    def scored_per_sample(self) -> bool:
        """Whether :meth:`sample_values` gives this loss's layer values for a batch of several runs'
        images at once (:class:`stx.engine.batching.ScoredTogether`)."""
        return False

    def sample_values(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        """The layer values of ``B`` runs' images from their ``features`` at one layer (``B×C×H×W``),
        image ``b`` against ``targets[b]`` (the runs' cached targets, concatenated): ``B`` values, each
        what :meth:`layer_loss` gives for that image alone."""
        raise NotImplementedError(f"{type(self).__name__} scores one image at a time")

    positional: ClassVar[bool] = False
    """Whether the targets are feature maps compared position by position (else statistics)."""

    def tileable(self) -> bool:
        """Whether :mod:`stx.engine.tiling` can evaluate this loss tile by tile: its layer values are
        functions of sums over feature positions (:meth:`position_sums`)."""
        return False

    def position_sums(self, features: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """Sums over the positions of ``features`` (``1×C×h×w``, part of a layer's map; ``target``:
        the target map at the same positions, for a :attr:`positional` loss) that, added up over
        the whole map, give the layer value through :meth:`from_position_sums`."""
        raise NotImplementedError(f"{type(self).__name__} cannot be tiled")

    def from_position_sums(self, sums: torch.Tensor, target: object, positions: int) -> torch.Tensor:
        """The layer value from the :meth:`position_sums` of all its ``positions``."""
        raise NotImplementedError(f"{type(self).__name__} cannot be tiled")

    def represent_from_sums(self, sums: torch.Tensor, positions: int) -> object:
        """A target image's representation (as :meth:`represent`) from its :meth:`position_sums`."""
        raise NotImplementedError(f"{type(self).__name__} cannot be tiled")

    def forward(self, features: Mapping[str, torch.Tensor], image: torch.Tensor) -> dict[str, torch.Tensor]:
        if not self.targets:
            raise RuntimeError(f"{type(self).__name__}.set_targets() must be called before use")
        return {layer: self.relative_value(layer, self._layer_value(features[layer], self.targets[layer]))
                for layer in self.layer_weights}

    def _layer_value(self, features: torch.Tensor, target: object) -> torch.Tensor:
        if self.normalize_gradients and features.requires_grad and torch.is_grad_enabled():
            return _L1NormalizedGradient.apply(features, lambda leaf: self.layer_loss(leaf, target))
        return self.layer_loss(features, target)


class ContentLoss(EncodingLoss):
    """Feature reconstruction loss against the content image: ``mean((F - F_t)²)``."""

    source = "content"
    positional = True

    def scored_per_sample(self) -> bool:
        return not self.normalize_gradients

    def sample_values(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(features, targets, reduction="none").flatten(1).mean(1)

    def tileable(self) -> bool:
        return not self.normalize_gradients

    def position_sums(self, features: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        return (features.float() - target).square().sum()

    def from_position_sums(self, sums: torch.Tensor, target: object, positions: int) -> torch.Tensor:
        return sums / (target.shape[0] * target.shape[1] * positions)


class GramStyleLoss(EncodingLoss):
    """Gram-matrix style loss (Gatys et al. 2016): ``mean((G - G_t)²)``, ``G = FFᵀ/(H·W)``.

    Several style images are blended by averaging their Gram matrices with the blend weights.
    """

    source = "style"

    def represent(self, features: torch.Tensor) -> torch.Tensor:
        return gram_matrix(features)

    def layer_loss(self, features: torch.Tensor, target: object) -> torch.Tensor:
        return gram_loss(features, target)

    def scored_per_sample(self) -> bool:
        return not self.normalize_gradients

    def sample_values(self, features: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return gram_loss(features, targets, per_sample=True)

    def tileable(self) -> bool:
        return not self.normalize_gradients

    def position_sums(self, features: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        flat = _float_flat(features)
        return torch.bmm(flat, flat.transpose(1, 2))

    def from_position_sums(self, sums: torch.Tensor, target: object, positions: int) -> torch.Tensor:
        return (self.represent_from_sums(sums, positions) - target).square().mean()

    def represent_from_sums(self, sums: torch.Tensor, positions: int) -> torch.Tensor:
        return sums / positions


class MeanStdStyleLoss(EncodingLoss):
    """Mean–standard-deviation style loss (AdaIN's statistics, Huang & Belongie 2017):
    ``mean((μ - μ_t)²) + mean((σ - σ_t)²)`` over the channels, ``σ = √(var + 1e-5)``."""

    source = "style"

    def represent(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return channel_moments(features)

    def blend(self, representations: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]) -> object:
        mean, variance = mixture_moments(representations, weights)
        return mean, variance.add(MEANSTD_EPS).sqrt()

    def layer_loss(self, features: torch.Tensor, target: object) -> torch.Tensor:
        mean_t, std_t = target
        mean, variance = channel_moments(features)
        std = variance.add(MEANSTD_EPS).sqrt()
        return F.mse_loss(mean, mean_t.to(mean.dtype)) + F.mse_loss(std, std_t.to(std.dtype))

    def zero_value(self, target: object) -> torch.Tensor:
        mean_t, std_t = target
        return mean_t.square().mean() + std_t.square().mean()

    def tileable(self) -> bool:
        return not self.normalize_gradients

    def position_sums(self, features: torch.Tensor, target: torch.Tensor | None = None) -> torch.Tensor:
        """``Σ f`` and ``Σ f²`` per channel, ``B×2×C`` (float64: the variance is ``E[f²] - μ²``)."""
        flat = features.flatten(2).double()
        return torch.stack([flat.sum(dim=2), flat.square().sum(dim=2)], dim=1)

    def represent_from_sums(self, sums: torch.Tensor, positions: int) -> tuple[torch.Tensor, torch.Tensor]:
        mean, square = sums[:, 0] / positions, sums[:, 1] / positions
        return mean.float(), (square - mean.square()).clamp_min(0).float()

    def from_position_sums(self, sums: torch.Tensor, target: object, positions: int) -> torch.Tensor:
        mean_t, std_t = target
        mean, variance = self.represent_from_sums(sums, positions)
        return F.mse_loss(mean, mean_t) + F.mse_loss(variance.add(MEANSTD_EPS).sqrt(), std_t)

    def working_floats(self, shapes: Mapping[str, tuple[int, int, int]]) -> int:
        return super().working_floats(shapes) + sum(4 * shapes[layer][0] for layer in self.layers)


class WassersteinStyleLoss(EncodingLoss):
    """Gaussian 2-Wasserstein style loss: ``(‖μ-μ_t‖² + tr(Σ + Σ_t - 2(Σ_t^½ Σ Σ_t^½)^½)) / C``
    with the channel means and covariances over ``H·W``.

    ``Σ_t^½`` is computed once per target (float64 eigendecomposition). The image's side needs
    no matrix square root: ``tr((Σ_t^½ Σ Σ_t^½)^½)`` is the nuclear norm of
    ``Σ_t^½ (F-μ) / √(H·W)``, computed from the eigenvalues of a ``C×C`` (or, with fewer
    positions than channels, ``H·W×H·W``) matrix with a bounded gradient (:class:`_NuclearNorm`).
    """

    source = "style"

    def represent(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return channel_covariance(features)

    def blend(self, representations: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float]) -> object:
        mean, covariance = mixture_moments(representations, weights)
        return mean, symmetric_sqrt(covariance), covariance.diagonal(dim1=1, dim2=2).sum(dim=1)

    def layer_loss(self, features: torch.Tensor, target: object) -> torch.Tensor:
        mean_t, root_t, trace_t = target
        flat = _float_flat(features)
        with torch.autocast(flat.device.type, enabled=False):
            mean = flat.mean(dim=2)
            centred = flat - mean.unsqueeze(2)
            positions = flat.shape[-1]
            cross = _NuclearNorm.apply(torch.bmm(root_t.to(flat.dtype), centred) / math.sqrt(positions))
            per_image = (mean - mean_t).square().sum(dim=1) + centred.square().sum(dim=(1, 2)) / positions + trace_t
            return (per_image.sum() - 2 * cross) / (flat.shape[0] * flat.shape[1])

    def zero_value(self, target: object) -> torch.Tensor:
        mean_t, _, trace_t = target
        return (mean_t.square().sum(dim=1) + trace_t).mean() / mean_t.shape[1]

    def working_floats(self, shapes: Mapping[str, tuple[int, int, int]]) -> int:
        """The centred features and their product with ``Σ_t^½`` (and its gradient), a few ``C×C``."""
        return super().working_floats(shapes) + sum(
            3 * math.prod(shapes[layer]) + 4 * shapes[layer][0] ** 2 for layer in self.layers
        )


REGION_KEYS = ("mask", "styles", "style_masks", "style_weights", "weight")


def _path_list(value: Any) -> list[str | None] | None:
    """``value`` as a list of paths (entries may be null), or None when it is not one."""
    if isinstance(value, str) or not isinstance(value, Sequence):
        return None
    items = list(value)
    return items if all(item is None or isinstance(item, str) for item in items) else None


@dataclass(frozen=True)
class Region:
    """One region of a :class:`GuidedGramStyleLoss` as configured: the ``mask`` image on the
    content (white: the region, black: outside; grey: partly), its ``styles`` (paths), their
    optional ``style_masks`` (paths or None: the whole style image) and blend ``style_weights``,
    and the region's ``weight``."""

    name: str
    mask: str
    styles: tuple[str, ...]
    style_masks: tuple[str | None, ...]
    style_weights: tuple[float, ...]
    weight: float

    @classmethod
    def from_config(cls, name: str, node: Any) -> Region:
        """Check a region's config node (``{mask, styles, style_masks, style_weights, weight}``;
        only ``mask`` and ``styles`` are required)."""
        where = f"regions.{name}"
        if not isinstance(node, Mapping):
            raise ConfigError(f"{where} is {node!r}; give a mapping {{mask: path, styles: [paths]}}.")
        unknown = sorted(set(map(str, node)) - set(REGION_KEYS))
        if unknown:
            raise ConfigError(f"{where} has unknown key(s) {', '.join(unknown)}; valid keys: {', '.join(REGION_KEYS)}.")
        mask, styles = node.get("mask"), _path_list(node.get("styles"))
        if not isinstance(mask, str) or not mask:
            raise ConfigError(
                f"{where} needs mask: the path of a mask image of the content's aspect ratio, got {mask!r}."
            )
        if not styles or None in styles:
            raise ConfigError(
                f"{where} needs styles: a non-empty list of style image paths, got {node.get('styles')!r}."
            )
        count = len(styles)
        style_masks = [None] * count if node.get("style_masks") is None else _path_list(node.get("style_masks"))
        if style_masks is None or len(style_masks) != count:
            raise ConfigError(
                f"{where}.style_masks={node.get('style_masks')!r} is not valid: give null (whole style images) or a "
                f"list with one entry per style ({count}), each a mask path or null."
            )
        weights = node.get("style_weights")
        try:
            weights = [1.0] * count if weights is None else [float(w) for w in weights]
        except (TypeError, ValueError) as exc:
            raise ConfigError(
                f"{where}.style_weights={weights!r} is not valid: give one number per style ({count}) or null."
            ) from exc
        if len(weights) != count or sum(_check_weight(w, f"{where} style weight") for w in weights) <= 0:
            raise ConfigError(
                f"{where}.style_weights={weights} is not valid: give one weight >= 0 per style ({count}), not all "
                f"zero, or null."
            )
        weight = _check_weight(node.get("weight", 1.0), f"{where} weight")
        return cls(name, mask, tuple(styles), tuple(style_masks), tuple(weights), weight)


@dataclass
class Guide:
    """A region's pixels: the content ``mask`` (``1×1×H×W`` in [0, 1], at the content's full
    size), the ``styles`` (``1×3×H×W``) and their masks (``1×1×H×W`` or None)."""

    mask: torch.Tensor
    styles: list[torch.Tensor]
    style_masks: list[torch.Tensor | None]


def mask_scale(mask: torch.Tensor, shape: Sequence[int]) -> torch.Tensor:
    """``mask`` (``1×1×H×W``) area-resized to ``shape`` and scaled by ``√(H·W / Σm²)``, so that
    ``gram_matrix(F · scale) = (F·m)(F·m)ᵀ / Σm²``."""
    resized = resize_mask(mask, shape)
    return resized * (resized[0, 0].numel() / resized.square().sum()).sqrt()


@dataclass
class _RegionTarget:
    weight: float
    gram: torch.Tensor
    mask: torch.Tensor
    """The content mask at the level's size; :meth:`scale` resizes it to each layer once."""
    scales: dict[tuple[int, ...], torch.Tensor] = field(default_factory=dict)

    def scale(self, shape: Sequence[int]) -> torch.Tensor:
        key = tuple(shape)
        if key not in self.scales:
            self.scales[key] = mask_scale(self.mask, key)
        return self.scales[key]


class GuidedGramStyleLoss(EncodingLoss):
    """Spatially guided Gram loss (Gatys et al. 2017): each region of the content, given by a
    mask, takes the Gram statistics of its own style images, computed under their style masks.

    ``regions`` maps names to :class:`Region` configs. The pixels are handed over once by
    :meth:`set_guides` (see :mod:`stx.engine.guidance`); at each pyramid level :meth:`set_region_targets`
    resizes the masks to the level and to every layer (area averaging, as pooling does) and
    caches each region's target Gram (several styles: the weighted average of their Grams).
    """

    source = "regions"

    def __init__(
        self,
        layers: Mapping[str, float],
        regions: Mapping[str, Any],
        score_weight: float = 1.0,
        normalize_gradients: bool = False,
        relative: bool = False,
    ) -> None:
        super().__init__(layers, score_weight, normalize_gradients, relative)
        if not isinstance(regions, Mapping) or not regions:
            raise ConfigError(
                f"regions={regions!r} is not valid: give at least one region, e.g. "
                f"{{sky: {{mask: sky_mask.png, styles: [clouds.jpg]}}}}."
            )
        self.regions = {str(name): Region.from_config(str(name), node) for name, node in regions.items()}
        self.guides: dict[str, Guide] = {}

    def set_guides(self, guides: Mapping[str, Guide]) -> None:
        """The regions' masks and style images, one :class:`Guide` per region name."""
        self.guides = dict(guides)

    @torch.no_grad()
    def set_region_targets(self, encoder: MultiLayerEncoder, content_shape: Sequence[int], style_edge: int) -> None:
        """Cache each region's target Grams at a pyramid level whose content is ``content_shape``
        (``H, W``) and whose style images have a long edge of ``style_edge`` px."""
        if set(self.guides) != set(self.regions):
            raise RuntimeError("GuidedGramStyleLoss.set_guides() must be called with every region before use")
        targets: dict[str, list[_RegionTarget]] = {layer: [] for layer in self.layers}
        for name, region in self.regions.items():
            guide = self.guides[name]
            total = sum(region.style_weights)
            grams: dict[str, torch.Tensor] = {}
            for image, mask, weight in zip(guide.styles, guide.style_masks, region.style_weights):
                image = resize(image, style_edge)
                encoding = encoder(image, self.layers)
                for layer, features in encoding.items():
                    if mask is not None:
                        features = features * mask_scale(resize_mask(mask, image.shape[-2:]), features.shape[-2:])
                    grams[layer] = grams.get(layer, 0) + weight / total * gram_matrix(features)
            level_mask = resize_mask(guide.mask, content_shape)
            for layer in self.layers:
                targets[layer].append(_RegionTarget(region.weight, grams[layer], level_mask))
        self.use_targets(targets)

    def layer_loss(self, features: torch.Tensor, target: object) -> torch.Tensor:
        return sum(r.weight * gram_loss(features * r.scale(features.shape[-2:]), r.gram) for r in target)

    def zero_value(self, target: object) -> torch.Tensor:
        return sum(r.weight * r.gram.square().mean() for r in target)

    def working_floats(self, shapes: Mapping[str, tuple[int, int, int]]) -> int:
        """Each region's masked copy of each layer's features and its gradient."""
        per_region = sum(2 * math.prod(shapes[layer]) for layer in self.layers)
        return super().working_floats(shapes) + len(self.regions) * per_region


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
        normalize_gradients: bool = False,
        relative: bool = False,
    ) -> None:
        super().__init__(layers, score_weight, normalize_gradients, relative)
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

    def zero_value(self, target: object) -> torch.Tensor:
        return sum(w * patches.square().mean() for w, patches, _ in target)


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
        self.set_content(content)
        self.set_styles(styles, style_weights)
        self.set_regions(content.shape[-2:], max(styles[0].shape[-2:]))

    def set_content(self, content: torch.Tensor) -> None:
        """Cache the content losses' targets only (``B×3×H×W``: a feed-forward model's training
        batch sets them once per batch, each image the target of the output at its index)."""
        for loss in self.losses.values():
            if loss.source == "content":
                loss.set_targets(self.encoder, [content], [1.0])

    def set_styles(self, styles: Sequence[torch.Tensor], style_weights: Sequence[float]) -> None:
        """Cache the style losses' targets only (blended over ``styles`` with ``style_weights``)."""
        for loss in self.losses.values():
            if loss.source == "style":
                loss.set_targets(self.encoder, styles, style_weights)

    def set_regions(self, content_shape: Sequence[int], style_edge: int) -> None:
        """Cache the guided losses' region targets for a content of ``content_shape`` (``H, W``)
        and region styles at a long edge of ``style_edge`` px (that of the level's style images)."""
        for loss in self.losses.values():
            if loss.source == "regions":
                loss.set_region_targets(self.encoder, content_shape, style_edge)

    def forward(self, image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self.score(self.encoder(image, self.layers) if self.layers else {}, image)

    def score(self, features: Mapping[str, torch.Tensor], image: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """``(total, values)`` as :meth:`forward` gives them, from the encoder's ``features`` of
        ``image`` (``{layer: 1×C×H×W}``, at least :attr:`layers`): the part of an evaluation after
        the encoder, which a batch of runs shares (:mod:`stx.engine.batching`)."""
        values: dict[str, torch.Tensor] = {}
        total = image.new_zeros(())
        for name, loss in self.losses.items():
            per_layer = loss(features, image)
            weighted = loss.weighted(per_layer)
            total = total + weighted
            values.update({f"{name}/{layer}": value for layer, value in per_layer.items()})
            values[name] = weighted
        return total, values
