"""Spatial guidance: guided Gram values, gradients, per-region styles, and refused masks."""

import functools

import pytest
import torch
from conftest import FAST
from PIL import Image
from torch.autograd import gradcheck

from stx.engine import losses
from stx.engine.optim import PyramidLevel, Schedule, optimise_image
from stx.errors import ConfigError
from stx.runs.job import build_job


def identity_encoder(image, layers):
    return {layer: image for layer in layers}


def guided(regions, **kwargs):
    """A guided loss on layer ``x`` whose regions are ``{name: Guide}`` (paths are placeholders)."""
    loss = losses.GuidedGramStyleLoss({"x": 1.0}, {name: {"mask": "m.png", "styles": ["s.png"] * len(guide.styles)}
                                                   for name, guide in regions.items()}, **kwargs)
    loss.set_guides(regions)
    return loss


def test_guided_gram_is_the_gram_of_the_masked_positions(rng):
    features = torch.rand(1, 3, 16, 32, generator=rng, dtype=torch.float64)
    style = torch.rand(1, 3, 16, 16, generator=rng)
    left = torch.zeros(1, 1, 16, 32)
    left[..., :16] = 1
    top = torch.zeros(1, 1, 16, 16)
    top[..., :8, :] = 1
    loss = guided({"a": losses.Guide(left, [style], [top])})
    loss.set_region_targets(identity_encoder, (16, 32), 16)
    f, s = features[..., :16].reshape(3, -1), style[..., :8, :].reshape(3, -1).double()
    expected = ((f @ f.T / f.shape[1] - s @ s.T / s.shape[1]) ** 2).mean()
    assert loss({"x": features}, None)["x"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_uniform_guide_gives_the_plain_gram_loss(rng):
    features, style = torch.rand(1, 3, 16, 16, generator=rng), torch.rand(1, 3, 16, 16, generator=rng)
    loss = guided({"all": losses.Guide(torch.full((1, 1, 16, 16), 0.4), [style], [None])})
    loss.set_region_targets(identity_encoder, (16, 16), 16)
    plain = losses.GramStyleLoss({"x": 1.0})
    plain.set_targets(identity_encoder, [style], [1.0])
    torch.testing.assert_close(loss({"x": features}, None)["x"], plain({"x": features}, None)["x"])


def test_guided_gram_gradient_matches_finite_differences(rng):
    left = torch.zeros(1, 1, 16, 16)
    left[..., :9] = 1
    styles = [torch.rand(1, 3, 16, 16, generator=rng, dtype=torch.float64) for _ in range(2)]
    loss = guided({"a": losses.Guide(left, styles[:1], [None]), "b": losses.Guide(1 - left, styles[1:], [None])})
    loss.set_region_targets(identity_encoder, (6, 6), 16)  # area-resized: a soft edge column
    features = torch.rand(1, 3, 6, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda f: loss({"x": f}, None)["x"], (features,), eps=1e-6, atol=1e-6)


def test_each_region_takes_the_colours_of_its_own_style(vgg19_random):
    red, blue = (torch.tensor(rgb).view(1, 3, 1, 1).expand(1, 3, 32, 32).contiguous() for rgb in ([0.9, 0.2, 0.1], [0.1, 0.2, 0.9]))
    left = torch.zeros(1, 1, 32, 64)
    left[..., :32] = 1
    style = losses.GuidedGramStyleLoss({"relu1_1": 0.5, "relu2_1": 0.5}, score_weight=1e3, regions={
        "left": {"mask": "left.png", "styles": ["red.png"]}, "right": {"mask": "right.png", "styles": ["blue.png"]}})
    style.set_guides({"left": losses.Guide(left, [red], [None]), "right": losses.Guide(1 - left, [blue], [None])})
    schedule = Schedule(levels=(PyramidLevel(64, 20),), make_optimizer=functools.partial(torch.optim.Adam, lr=0.1),
                        init="content", bounds="sigmoid", max_rise=0, style_scale=1.0, checkpoint_every=0,
                        precision="fp32", seed=0)
    grey = torch.full((1, 3, 32, 64), 0.5)
    image = optimise_image(losses.PerceptualObjective(vgg19_random, {"style": style}), content=grey, styles=[red],
                           style_weights=[1.0], schedule=schedule)
    halves = image[..., :32].mean(dim=(0, 2, 3)), image[..., 32:].mean(dim=(0, 2, 3))
    for half, own, other in zip(halves, (red, blue), (blue, red)):
        own, other = own[0, :, 0, 0], other[0, :, 0, 0]
        assert (half - own).norm() < 0.5 * (half - other).norm(), halves


def write_mask(path, size, box=None):
    mask = Image.new("L", size, 0)
    if box is not None:
        mask.paste(255, box)
    mask.save(path)
    return path


GUIDED = ["loss=guided", *FAST, "schedule.size=48"]


@pytest.mark.parametrize(
    ("mask", "override", "message"),
    [
        ((451, 300, None), None, "loss.style.regions.left.mask '{path}' is empty (all black)"),
        ((451, 300, (0, 0, 8, 8)), None, "loss.style.regions.left.mask '{path}' covers only 0.0027 of the 2×3 positions of layer relu5_1 at the 48 px"),
        ((300, 300, (0, 0, 150, 300)), None, "is 300×300 px (aspect 1.000) but the image it guides, "),
        (None, "loss.style.regions.left.mask=missing.png", "loss.style.regions.left.mask: image '{tmp}/missing.png' does not exist"),
        (None, "loss.style.regions.left.styles=[]", "loss.style: regions.left needs styles: a non-empty list of style image paths"),
        (None, "loss.style.regions.left.style_weights=[1,2]", "loss.style: regions.left.style_weights=[1.0, 2.0] is not valid: give one weight >= 0 per style (1)"),
        (None, "loss.style.regions=null", "loss.style: regions=None is not valid: give at least one region"),
    ],
    ids=["empty", "too-small", "aspect", "missing", "no-styles", "style-weights", "no-regions"],
)
def test_bad_regions_are_refused_before_work(make_cfg, tmp_path, monkeypatch, mask, override, message):
    monkeypatch.chdir(tmp_path)
    overrides = list(GUIDED)
    path = ""
    if mask is not None:
        path = str(write_mask(tmp_path / "mask.png", mask[:2], mask[2]))
        overrides.append(f"loss.style.regions.left.mask={path}")
    if override is not None:
        overrides.append(override)
    with pytest.raises(ConfigError) as error:
        build_job(make_cfg(*overrides))
    assert message.format(path=path, tmp=tmp_path) in str(error.value)


def test_style_masks_are_checked_against_their_style(make_cfg, tmp_path):
    path = write_mask(tmp_path / "style_mask.png", (451, 300), (0, 0, 200, 300))
    with pytest.raises(ConfigError, match=r"loss.style.regions.left.style_masks\[0\] .* but the image it guides"):
        build_job(make_cfg(*GUIDED, f"loss.style.regions.left.style_masks=[{path}]"))
