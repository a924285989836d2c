"""Tiled evaluation gives the untiled objective's values, targets and gradient (no seams)."""

import pytest
import torch

from stx.engine import encoders, losses
from stx.engine.tiling import TiledObjective, encoder_reach, tile_grid
from stx.errors import ConfigError

LAYERS = {"relu1_1": 0.2, "relu2_1": 0.2, "relu3_1": 0.2, "relu4_1": 0.2, "relu5_1": 0.2}


def objective(encoder_layers=("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu4_2", "relu5_1"), pooling="max"):
    encoder = encoders.vgg19(list(encoder_layers), weights="random", pooling=pooling, seed=0)
    loss_set = {
        "content": losses.ContentLoss({"relu4_2": 1.0}, relative=True),
        "style": losses.GramStyleLoss(LAYERS, score_weight=1e3),
        "statistics": losses.MeanStdStyleLoss({"relu2_1": 0.5, "relu4_1": 0.5}, score_weight=10.0, relative=True),
        "tv": losses.TotalVariationLoss(score_weight=0.5),
    }
    return losses.PerceptualObjective(encoder, loss_set)


def images(generator, height, width):
    content = torch.rand(1, 3, height, width, generator=generator)
    style = torch.rand(1, 3, height + 8, width - 5, generator=generator)
    image = torch.rand(1, 3, height, width, generator=generator)
    return content, style, image


def value_and_gradient(model, image):
    image = image.clone().requires_grad_(True)
    total, values = model(image)
    total.backward()
    return total.detach(), {k: v.detach() for k, v in values.items()}, image.grad


def test_vgg_reach_matches_its_convolutions_and_poolings():
    encoder = encoders.vgg19(["relu5_1"], weights="random", pooling="max", seed=0)
    reach = encoder_reach(encoder)
    # 3×3 convolutions reach 1 px × the stride before and after; 2×2 poolings 1 px × stride after.
    assert (reach.before, reach.after, reach.align) == (70, 85, 16)
    assert reach.jumps["relu3_1"] == 4


def test_tiles_cover_the_image_once():
    encoder = encoders.vgg19(["relu3_1"], weights="random", pooling="max", seed=0)
    reach = encoder_reach(encoder)
    grid = tile_grid(50, 37, 8, reach)
    owned = torch.zeros(50, 37)
    for tile in grid:
        owned[slice(*tile.own_rows), slice(*tile.own_cols)] += 1
        assert tile.top % reach.align == 0 and tile.left % reach.align == 0
    assert (owned == 1).all()


@pytest.mark.parametrize("pooling, tile", [("max", 32), ("avg", 16)])
def test_tiled_values_targets_and_gradient_equal_untiled(pooling, tile):
    generator = torch.Generator().manual_seed(0)
    content, style, image = images(generator, 70, 53)  # not multiples of the stride
    plain = objective(pooling=pooling)
    plain.set_targets(content, [style], [1.0])
    tiled = TiledObjective(objective(pooling=pooling), tile=tile)
    tiled.set_targets(content, [style], [1.0])
    for name in ("content", "style", "statistics"):
        for layer, target in plain.losses[name].targets.items():
            torch.testing.assert_close(tiled.losses[name].targets[layer], target, rtol=1e-5, atol=1e-6)
    total, values, gradient = value_and_gradient(plain, image)
    tiled_total, tiled_values, tiled_gradient = value_and_gradient(tiled, image)
    torch.testing.assert_close(tiled_total, total, rtol=1e-5, atol=0)
    assert values.keys() == tiled_values.keys()
    for key, value in values.items():
        torch.testing.assert_close(tiled_values[key], value, rtol=1e-4, atol=1e-9)
    scale = gradient.abs().max()
    assert (tiled_gradient - gradient).abs().max() < 1e-4 * scale


def test_an_image_that_fits_one_tile_is_evaluated_untiled():
    generator = torch.Generator().manual_seed(1)
    content, style, image = images(generator, 32, 24)
    plain, tiled = objective(), TiledObjective(objective(), tile=32)
    plain.set_targets(content, [style.clone()[..., :32, :]], [1.0])
    tiled.set_targets(content, [style.clone()[..., :32, :]], [1.0])
    assert torch.equal(value_and_gradient(plain, image)[2], value_and_gradient(tiled, image)[2])


def test_what_cannot_be_tiled_is_refused():
    encoder = encoders.vgg19(["relu3_1", "relu4_1"], weights="random", pooling="max", seed=0)
    mrf = losses.PerceptualObjective(encoder, {"style": losses.MRFStyleLoss({"relu3_1": 1.0})})
    with pytest.raises(ConfigError, match="cannot tile loss.style"):
        TiledObjective(mrf, tile=64)
    normalized = losses.PerceptualObjective(encoder, {"style": losses.GramStyleLoss({"relu3_1": 1.0}, normalize_gradients=True)})
    with pytest.raises(ConfigError, match="cannot tile loss.style"):
        TiledObjective(normalized, tile=64)
    with pytest.raises(ConfigError, match="multiple of 8"):
        TiledObjective(losses.PerceptualObjective(encoder, {"style": losses.GramStyleLoss({"relu4_1": 1.0})}), tile=20)


def test_auto_tiles_only_what_does_not_fit(make_cfg, monkeypatch):
    from conftest import FAST

    from stx.engine import plan
    from stx.runs.job import build_job

    overrides = [*FAST, "schedule.size=512", "schedule.tile=auto"]
    assert not isinstance(build_job(make_cfg(*overrides)).loss, TiledObjective)
    plain = build_job(make_cfg(*FAST, "schedule.size=512"))
    shape = plain.content.shape[-2:]
    untiled = sum(plan.estimate_bytes(plain.loss, *shape, plain.schedule.state_images, 1).values())
    monkeypatch.setattr(plan, "available_bytes", lambda device: int(0.8 * untiled / plan.HEADROOM))
    job = build_job(make_cfg(*overrides))
    assert isinstance(job.loss, TiledObjective) and job.loss.tile < 512
    with pytest.raises(ConfigError, match="schedule size 512 px needs about .* set schedule.tile=auto"):
        build_job(make_cfg(*FAST, "schedule.size=512"))
    with pytest.raises(ConfigError, match="Tiling .* cannot help here.*cannot tile loss.style"):
        build_job(make_cfg(*overrides, "loss=mrf"))


@pytest.mark.parametrize("value, message", [("big", "schedule.tile='big' is not valid"), ("24", "multiple of 16")])
def test_bad_tile_settings_are_refused(make_cfg, value, message):
    from conftest import FAST

    from stx.runs.job import build_job

    with pytest.raises(ConfigError, match=message):
        build_job(make_cfg(*FAST, f"schedule.tile={value}"))


@pytest.mark.parametrize("setting, tag", [("auto", "off"), ("48", "48")])
def test_the_tile_a_run_used_is_a_tag(make_cfg, tmp_path, setting, tag, fresh_store):
    from conftest import FAST, local_uri
    from mlflow.tracking import MlflowClient

    from stx.runs.runner import run_tracked

    fresh_store(tmp_path)
    result = run_tracked(make_cfg(*FAST, "schedule.size=96", f"schedule.tile={setting}", "tracking.image_every=0"),
                         tmp_path / "job", {})
    assert MlflowClient(local_uri(tmp_path)).get_run(result.run_id).data.tags["stx.tile"] == tag
