"""Colour control (Gatys et al. 2017, "Controlling Perceptual Factors in Neural Style Transfer").

A :class:`ColorControl` changes the images before optimisation (:meth:`~ColorControl.prepare`,
:meth:`~ColorControl.start`) and the optimised image after it (:meth:`~ColorControl.finish`);
the ``color`` config group picks one. Images are float ``1×3×H×W`` RGB tensors in [0, 1].

Luminance and chroma are those of YIQ (NTSC), the space the paper uses: ``Y`` is the luma
``0.299 R + 0.587 G + 0.114 B``, ``I`` and ``Q`` the chroma. Recombined images are clamped
to [0, 1], so chroma is kept exactly wherever the result stays inside the RGB gamut.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from stx.errors import ConfigError

RGB_TO_YIQ = torch.tensor([
    [0.299, 0.587, 0.114],
    [0.5959, -0.2746, -0.3213],
    [0.2115, -0.5227, 0.3112],
])
YIQ_TO_RGB = torch.linalg.inv(RGB_TO_YIQ)
EPS = 1e-5


def _mix(matrix: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
    """Apply a 3×3 colour ``matrix`` to every pixel of a ``B×3×H×W`` image."""
    return torch.einsum("ij,bjhw->bihw", matrix.to(image), image)


def rgb_to_yiq(image: torch.Tensor) -> torch.Tensor:
    """``B×3×H×W`` RGB → YIQ (channel 0 the luma, 1–2 the chroma)."""
    return _mix(RGB_TO_YIQ, image)


def yiq_to_rgb(image: torch.Tensor) -> torch.Tensor:
    """``B×3×H×W`` YIQ → RGB (not clamped)."""
    return _mix(YIQ_TO_RGB, image)


def luminance(image: torch.Tensor) -> torch.Tensor:
    """The luma of a ``B×3×H×W`` RGB image, shape ``B×1×H×W``."""
    return rgb_to_yiq(image)[:, :1]


def gray(luma: torch.Tensor) -> torch.Tensor:
    """A ``B×1×H×W`` luma as a grey RGB image ``B×3×H×W`` (the encoder takes three channels)."""
    return luma.expand(-1, 3, -1, -1).clamp(0, 1)


def with_chroma_of(image: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``image``'s luma with ``source``'s chroma (``source`` resized to ``image``'s size), in [0, 1]."""
    if source.shape[-2:] != image.shape[-2:]:
        source = F.interpolate(source, size=image.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
    yiq = torch.cat([luminance(image), rgb_to_yiq(source)[:, 1:]], dim=1)
    return yiq_to_rgb(yiq).clamp(0, 1)


def color_statistics(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (``3``) and covariance (``3×3``) of the RGB values of all pixels of ``image``."""
    pixels = image.flatten(2).transpose(0, 1).flatten(1).double()  # 3 × (B·H·W)
    mean = pixels.mean(dim=1)
    centred = pixels - mean[:, None]
    return mean, centred @ centred.T / centred.shape[1]


def _symmetric_power(matrix: torch.Tensor, power: float) -> torch.Tensor:
    values, vectors = torch.linalg.eigh(matrix)
    return vectors @ torch.diag(values.clamp_min(EPS) ** power) @ vectors.T


DECOMPOSITIONS = ("eigen", "cholesky")


def match_color(image: torch.Tensor, reference: torch.Tensor, decomposition: str = "eigen") -> torch.Tensor:
    """``image`` with its pixels moved by one affine map ``x ↦ A x + b`` so that their mean and
    covariance equal ``reference``'s (then clamped to [0, 1]).

    ``decomposition`` chooses ``A``: ``"eigen"`` is ``Σ_r^{1/2} Σ_i^{-1/2}`` with symmetric
    square roots from an eigendecomposition (the "image analogies" variant of Gatys et al. 2017),
    ``"cholesky"`` is ``L_r L_i^{-1}`` with ``Σ = L Lᵀ``. Both match the statistics exactly;
    they differ by a rotation of the colours.
    """
    mean_i, cov_i = color_statistics(image)
    mean_r, cov_r = color_statistics(reference)
    ridge = EPS * torch.eye(3, dtype=cov_i.dtype)
    if decomposition == "eigen":
        transform = _symmetric_power(cov_r, 0.5) @ _symmetric_power(cov_i, -0.5)
    else:
        transform = torch.linalg.cholesky(cov_r + ridge) @ torch.linalg.inv(torch.linalg.cholesky(cov_i + ridge))
    offset = mean_r - transform @ mean_i
    pixels = _mix(transform, image.double()) + offset.view(1, 3, 1, 1)
    return pixels.to(image.dtype).clamp(0, 1)


def match_luminance(luma: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``luma`` shifted and scaled to the mean and standard deviation of ``reference`` (both ``B×1×H×W``)."""
    scale = reference.std() / luma.std().clamp_min(EPS)
    return (luma - luma.mean()) * scale + reference.mean()


class ColorControl:
    """No colour control (``color=none``): the images are optimised as they are.

    Subclasses override :meth:`prepare` (the content and style images the objective sees),
    :meth:`start` (an image to start from) and :meth:`finish` (the optimised image → the result).
    """

    def prepare(self, content: torch.Tensor, styles: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Remember the original ``content`` and return the images to optimise against."""
        self.content = content
        return content, list(styles)

    def start(self, image: torch.Tensor) -> torch.Tensor:
        """An image to start the optimisation from, in the space :meth:`prepare` returned."""
        return image

    def finish(self, image: torch.Tensor) -> torch.Tensor:
        """The result for an optimised ``image`` (any size; applied to every logged image too)."""
        return image


class LuminanceTransfer(ColorControl):
    """``color=luminance``: style transfer on luminance only; the result keeps the content's chroma.

    The objective sees grey images: the content's luma and each style's luma, the latter first
    shifted and scaled to the content luma's mean and standard deviation when
    ``match_luminance`` (Gatys et al. 2017, §5.1). The result is the optimised image's luma
    with the content's chroma.
    """

    def __init__(self, match_luminance: bool = True) -> None:
        self.match_luminance = bool(match_luminance)

    def prepare(self, content: torch.Tensor, styles: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.content = content
        content_luma = luminance(content)
        style_lumas = [luminance(style) for style in styles]
        if self.match_luminance:
            style_lumas = [match_luminance(luma, content_luma) for luma in style_lumas]
        return gray(content_luma), [gray(luma) for luma in style_lumas]

    def start(self, image: torch.Tensor) -> torch.Tensor:
        return gray(luminance(image))

    def finish(self, image: torch.Tensor) -> torch.Tensor:
        return with_chroma_of(image, self.content)


class HistogramMatching(ColorControl):
    """``color=histogram``: each style image's colours are mapped to the content's mean and
    covariance before optimisation (see :func:`match_color`); the result is left as it is."""

    def __init__(self, decomposition: str = "eigen") -> None:
        if decomposition not in DECOMPOSITIONS:
            raise ConfigError(
                f"color.decomposition={decomposition!r} is not valid; use one of {', '.join(DECOMPOSITIONS)}."
            )
        self.decomposition = decomposition

    def prepare(self, content: torch.Tensor, styles: Sequence[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        self.content = content
        return content, [match_color(style, content, self.decomposition) for style in styles]


class OriginalColors(ColorControl):
    """``color=original_colors``: optimise as usual, then keep the result's luma with the
    content's chroma (neural-style's ``-original_colors``)."""

    def finish(self, image: torch.Tensor) -> torch.Tensor:
        return with_chroma_of(image, self.content)
