"""Colour control: YIQ conversions, colour statistics matching, luminance-only transfer,
original colours, and a whole job with ``color=luminance``."""

import numpy as np
import pytest
import torch
from conftest import FAST
from PIL import Image

from stx import api
from stx.engine import color
from stx.errors import ConfigError
from stx.runs.job import build_job


def mid_range(generator: torch.Generator, tint: tuple[float, float, float], size: int = 16) -> torch.Tensor:
    """A ``1×3×size×size`` image of small random variations around ``tint`` (inside the gamut)."""
    noise = torch.rand(1, 3, size, size, generator=generator) - 0.5
    mixed = noise + 0.5 * noise.roll(1, dims=1)  # correlated channels: a non-diagonal covariance
    return (torch.tensor(tint).view(1, 3, 1, 1) + 0.2 * mixed).clamp(0, 1)


def chroma(image: torch.Tensor) -> torch.Tensor:
    return color.rgb_to_yiq(image)[:, 1:]


def test_yiq_round_trip_and_luma_weights(rng):
    image = torch.rand(2, 3, 5, 7, generator=rng)
    torch.testing.assert_close(color.yiq_to_rgb(color.rgb_to_yiq(image)), image, atol=1e-6, rtol=0)
    red = torch.zeros(1, 3, 1, 1)
    red[0, 0] = 1.0
    assert color.luminance(red).item() == pytest.approx(0.299)
    grey = torch.full((1, 3, 2, 2), 0.4)
    torch.testing.assert_close(chroma(grey), torch.zeros(1, 2, 2, 2), atol=1e-6, rtol=0)


@pytest.mark.parametrize("decomposition", color.DECOMPOSITIONS)
def test_match_color_gives_the_reference_mean_and_covariance(rng, decomposition):
    image = mid_range(rng, (0.3, 0.5, 0.6))
    reference = mid_range(rng, (0.6, 0.4, 0.35))
    matched = color.match_color(image, reference, decomposition)
    mean, covariance = color.color_statistics(matched)
    mean_r, covariance_r = color.color_statistics(reference)
    torch.testing.assert_close(mean, mean_r, atol=1e-5, rtol=0)
    torch.testing.assert_close(covariance, covariance_r, atol=1e-5, rtol=1e-3)


def test_eigen_and_cholesky_differ_by_a_rotation_only(rng):
    image = mid_range(rng, (0.3, 0.5, 0.6))
    reference = mid_range(rng, (0.6, 0.4, 0.35))
    eigen = color.match_color(image, reference, "eigen")
    cholesky = color.match_color(image, reference, "cholesky")
    assert (eigen - cholesky).abs().max() > 1e-3  # two different maps with the same statistics


def test_luminance_transfer_optimises_grey_images_with_matched_luma(rng):
    content = mid_range(rng, (0.3, 0.5, 0.6))
    style = mid_range(rng, (0.8, 0.7, 0.2))
    control = color.LuminanceTransfer(match_luminance=True)
    prepared, (prepared_style,) = control.prepare(content, [style])
    for image in (prepared, prepared_style):
        torch.testing.assert_close(image[:, 0], image[:, 1])
        torch.testing.assert_close(image[:, 0], image[:, 2])
    torch.testing.assert_close(prepared[:, :1], color.luminance(content).clamp(0, 1))
    style_luma, content_luma = prepared_style[:, :1], color.luminance(content)
    assert style_luma.mean().item() == pytest.approx(content_luma.mean().item(), abs=1e-5)
    assert style_luma.std().item() == pytest.approx(content_luma.std().item(), abs=1e-5)


@pytest.mark.parametrize("control", [color.LuminanceTransfer(), color.OriginalColors()])
def test_finish_keeps_the_content_chroma_and_the_result_luma(rng, control):
    content = mid_range(rng, (0.45, 0.5, 0.55))
    control.prepare(content, [mid_range(rng, (0.8, 0.7, 0.2))])
    optimised = mid_range(rng, (0.5, 0.45, 0.5))
    result = control.finish(optimised)
    assert result.min() > 0 and result.max() < 1  # inside the gamut: nothing clamped
    torch.testing.assert_close(chroma(result), chroma(content), atol=1e-5, rtol=0)
    torch.testing.assert_close(color.luminance(result), color.luminance(optimised), atol=1e-5, rtol=0)


def test_finish_resizes_the_content_chroma_to_a_pyramid_level(rng):
    content = mid_range(rng, (0.45, 0.5, 0.55), size=32)
    control = color.OriginalColors()
    control.prepare(content, [content])
    assert control.finish(torch.full((1, 3, 8, 8), 0.5)).shape == (1, 3, 8, 8)


def test_histogram_matching_maps_the_styles_and_leaves_the_result(rng):
    content = mid_range(rng, (0.3, 0.5, 0.6))
    style = mid_range(rng, (0.8, 0.7, 0.2))
    control = color.HistogramMatching("eigen")
    prepared, (matched,) = control.prepare(content, [style])
    assert prepared is content
    torch.testing.assert_close(color.color_statistics(matched)[0], color.color_statistics(content)[0], atol=1e-5, rtol=0)
    image = torch.rand(1, 3, 4, 4, generator=rng)
    assert control.finish(image) is image


def test_bad_decomposition_is_refused_before_work(make_cfg):
    with pytest.raises(ConfigError, match=r"color.decomposition='svd'.*eigen, cholesky"):
        build_job(make_cfg(*FAST, "color=histogram", "color.decomposition=svd"))


def test_job_with_luminance_transfer_keeps_the_content_chroma(tmp_path, monkeypatch, fresh_store):
    """A whole job on a hand-made content (a smooth in-gamut colour ramp) and a grey-free style:
    the written output has the content's chroma; its luma comes from the optimisation."""
    monkeypatch.setenv("STX_RUNS_DIR", str(tmp_path / "runs"))
    fresh_store(tmp_path)
    ramp = np.linspace(0.35, 0.65, 32, dtype=np.float32)
    content = np.stack([np.tile(ramp, (32, 1)), np.tile(ramp[:, None], (1, 32)), np.full((32, 32), 0.5)], axis=-1)
    style = np.zeros((32, 32, 3), dtype=np.float32)
    style[::4] = (0.9, 0.1, 0.1)
    style[2::4] = (0.1, 0.2, 0.9)
    for name, array in (("content.png", content), ("style.png", style)):
        Image.fromarray((array * 255).round().astype(np.uint8)).save(tmp_path / name)
    result = api.run([*FAST, "schedule.steps=5", "schedule.init=random", "color=luminance", f"images.content={tmp_path / 'content.png'}",
                      f"images.styles=[{tmp_path / 'style.png'}]"])
    output = torch.from_numpy(np.asarray(result.image, dtype=np.float32) / 255).permute(2, 0, 1)[None]
    written = torch.from_numpy(np.asarray(Image.open(tmp_path / "content.png"), dtype=np.float32) / 255)
    inside = ((output > 0.01) & (output < 0.99)).all(dim=1, keepdim=True).expand(-1, 2, -1, -1)
    assert inside.float().mean() > 0.9
    expected = chroma(written.permute(2, 0, 1)[None])
    assert (chroma(output) - expected)[inside].abs().max() < 3 / 255  # 8-bit rounding of three channels
    assert (color.luminance(output) - color.luminance(written.permute(2, 0, 1)[None])).abs().max() > 0.01
    assert result.metrics["eval/color_distance_content"] >= 0
