"""What a person checks at first look at a stylisation, as three numbers and thresholds.

A stylisation a person keeps shows the photo's subject in the style's colours and texture. Each
number below catches one way a picture fails that, and its threshold sits between the pictures a
person keeps and those they do not (measured in ``tests/test_first_look.py`` and ``docs/gallery.md``):

* :func:`colour_move` ≥ :data:`MIN_COLOUR_MOVE`: the output took at least half of the way from the
  content's colours to the style's (CIELAB per-channel means and standard deviations);
* :func:`structure` ≥ :data:`MIN_STRUCTURE`: the luminance SSIM with the content at a thumbnail's
  size (:data:`STRUCTURE_SIZE` px long edge), where a person recognises the subject: the style's
  texture in the content's frame scores 0.05 there, stylisations that keep the cat 0.4–0.6.
  At full size SSIM also counts the strokes a stylisation paints on purpose (the same pictures
  score 0.2–0.3 at 256 px);
* style ratio ≤ :data:`MAX_STYLE_RATIO`: the judge's ``style_distance`` of the output is at most
  0.8 × the content's own (the output's style statistics moved towards the style's).

Images are ``1×3×H×W`` float tensors in [0, 1]; the output and the content have the same shape.
"""

from __future__ import annotations

import torch

from stx.engine.judge import STRUCTURE_SIZE, Judge, gaussian_profile, srgb_to_lab, ssim, thumbnail

MIN_COLOUR_MOVE = 0.5
MIN_STRUCTURE = 0.35
MAX_STYLE_RATIO = 0.8


def colour_stats(image: torch.Tensor) -> torch.Tensor:
    """Per-channel mean and standard deviation of a ``1×3×H×W`` image in CIELAB (6 values, ΔE units)."""
    lab = srgb_to_lab(image[0].flatten(1).double())
    return torch.cat([lab.mean(dim=1), lab.std(dim=1)])


def colour_move(image: torch.Tensor, content: torch.Tensor, style: torch.Tensor) -> float:
    """Fraction of the content-to-style distance of :func:`colour_stats` that ``image`` has closed
    (0: the content's colours, 1: the style's; negative: further from the style than the content)."""
    target = colour_stats(style)
    return 1 - ((colour_stats(image) - target).norm() / (colour_stats(content) - target).norm()).item()


def structure(image: torch.Tensor, content: torch.Tensor) -> float:
    """SSIM of the luminances of ``image`` and ``content`` (same shape), both at :data:`STRUCTURE_SIZE`
    px long edge (1: the content's structure; about 0: none of it); the judge's ``structure``."""
    return ssim(thumbnail(image.float()), thumbnail(content.float()), gaussian_profile()).item()


def first_look(image: torch.Tensor, content: torch.Tensor, style: torch.Tensor, judge: Judge) -> dict[str, float]:
    """``colour_move``, ``structure`` and ``style_ratio`` of ``image`` (``judge`` has its references set
    from ``content`` and the style) and ``passed`` (1.0 when all three meet their thresholds, else 0.0)."""
    values = {
        "colour_move": colour_move(image, content, style),
        "structure": structure(image, content),
        "style_ratio": judge(image)["style_distance"] / judge(content)["style_distance"],
    }
    passed = (values["colour_move"] >= MIN_COLOUR_MOVE and values["structure"] >= MIN_STRUCTURE
              and values["style_ratio"] <= MAX_STYLE_RATIO)
    return {**values, "passed": float(passed)}
