import math

import pytest
import scipy.linalg
import torch
from torch.autograd import gradcheck

from stx.engine import encoders, losses
from stx.errors import ConfigError


def test_gram_matrix_hand_computed():
    features = torch.tensor([[1.0, 2.0], [3.0, 4.0]]).view(1, 2, 1, 2)  # C=2, H·W=2
    expected = torch.tensor([[5.0, 11.0], [11.0, 25.0]]) / 2
    torch.testing.assert_close(losses.gram_matrix(features), expected.unsqueeze(0))


def test_total_variation_hand_computed():
    image = torch.tensor([[0.0, 1.0, 3.0], [2.0, 4.0, 4.0], [1.0, 1.0, 0.0]]).view(1, 1, 3, 3)
    # positions (0,0),(0,1),(1,0),(1,1): dx = 1,2,2,0 ; dy = 2,3,-1,-3
    squared = torch.tensor([1 + 4, 4 + 9, 4 + 1, 0 + 9.0])
    torch.testing.assert_close(losses.total_variation(image), squared.mean())
    torch.testing.assert_close(losses.total_variation(image, exponent=1.0), squared.sqrt().mean())


def test_fused_gram_loss_matches_autograd_reference(rng):
    features = torch.rand(2, 5, 4, 3, generator=rng, dtype=torch.float64, requires_grad=True)
    target = losses.gram_matrix(torch.rand(2, 5, 4, 3, generator=rng, dtype=torch.float64))
    fused = losses.gram_loss(features, target)
    (fused_grad,) = torch.autograd.grad(fused, features)
    flat = features.flatten(2)
    reference = ((flat @ flat.transpose(1, 2) / 12 - target) ** 2).mean()
    (reference_grad,) = torch.autograd.grad(reference, features)
    torch.testing.assert_close(fused, reference)
    torch.testing.assert_close(fused_grad, reference_grad)


def identity_encoder(image, layers):
    """An encoder whose every layer is the input itself (targets are then hand-made tensors)."""
    return {layer: image for layer in layers}


def test_content_and_gram_loss_values(rng):
    features = torch.rand(1, 4, 5, 6, generator=rng)
    target = torch.rand(1, 4, 5, 6, generator=rng)
    content = losses.ContentLoss({"x": 1.0})
    content.set_targets(identity_encoder, [target], [1.0])
    assert content({"x": features}, None)["x"].item() == pytest.approx(((features - target) ** 2).mean().item())
    style = losses.GramStyleLoss({"x": 1.0})
    style.set_targets(identity_encoder, [target], [1.0])
    f, t = features.view(4, 30), target.view(4, 30)
    expected = ((f @ f.T / 30 - t @ t.T / 30) ** 2).mean()
    assert style({"x": features}, None)["x"].item() == pytest.approx(expected.item(), rel=1e-5)


def test_relative_values_are_squared_relative_distances(rng):
    """``relative``: content ``‖F−F_t‖²/‖F_t‖²``, Gram ``‖G−G_t‖²/‖G_t‖²`` (the judge's distances squared),
    unchanged when the network's activations are scaled by any factor."""
    features = torch.rand(1, 4, 5, 6, generator=rng, dtype=torch.float64)
    target = torch.rand(1, 4, 5, 6, generator=rng, dtype=torch.float64)
    f, t = features.view(4, 30), target.view(4, 30)
    gram, gram_t = f @ f.T / 30, t @ t.T / 30
    expected = {"content": ((f - t).norm() / t.norm()) ** 2, "style": ((gram - gram_t).norm() / gram_t.norm()) ** 2}
    for name, make in (("content", losses.ContentLoss), ("style", losses.GramStyleLoss)):
        for factor in (1.0, 37.0, 1e-3):
            loss = make({"x": 1.0}, relative=True)
            loss.set_targets(identity_encoder, [target * factor], [1.0])
            assert loss({"x": features * factor}, None)["x"].item() == pytest.approx(expected[name].item(), rel=1e-9)


@pytest.mark.parametrize("make", [
    lambda: losses.ContentLoss({"x": 1.0}, relative=True),
    lambda: losses.GramStyleLoss({"x": 1.0}, relative=True),
    lambda: losses.MeanStdStyleLoss({"x": 1.0}, relative=True),
    lambda: losses.WassersteinStyleLoss({"x": 1.0}, relative=True),
], ids=["content", "gram", "meanstd", "wasserstein"])
def test_relative_values_score_all_zero_features_one(make, rng):
    """The divisor is what all-zero features score against the target, so they score 1 (mean–std's
    σ of zero features is √1e-5, not 0: within that)."""
    loss = _targets_for(make(), rng, shape=(1, 3, 6, 6))
    assert loss({"x": torch.zeros(1, 3, 6, 6, dtype=torch.float64)}, None)["x"].item() == pytest.approx(1.0, abs=1e-2)
    plain = make()
    plain.relative = False
    plain.use_targets(loss.targets)
    image = torch.rand(1, 3, 6, 6, generator=rng, dtype=torch.float64)
    assert loss({"x": image}, None)["x"].item() == pytest.approx(
        plain({"x": image}, None)["x"].item() / loss.zero_value(loss.targets["x"]).item(), rel=1e-9)


def test_relative_mrf_divides_by_the_style_patches_mean_square(rng):
    style = torch.rand(1, 2, 5, 5, generator=rng, dtype=torch.float64)
    image = torch.rand(1, 2, 5, 5, generator=rng, dtype=torch.float64)
    relative, plain = (losses.MRFStyleLoss({"x": 1.0}, patch_size=2, relative=flag) for flag in (True, False))
    for loss in (relative, plain):
        loss.set_targets(identity_encoder, [style], [1.0])
    patches = losses.extract_patches(style, 2, 1)
    assert relative({"x": image}, None)["x"].item() == pytest.approx(
        plain({"x": image}, None)["x"].item() / patches.square().mean().item(), rel=1e-9)


def test_mrf_matches_identical_patches_to_zero_loss(rng):
    features = torch.rand(1, 3, 6, 6, generator=rng)
    mrf = losses.MRFStyleLoss({"x": 1.0}, patch_size=3)
    mrf.set_targets(identity_encoder, [features], [1.0])
    assert mrf({"x": features}, None)["x"].item() == pytest.approx(0.0, abs=1e-12)
    assert mrf({"x": features + 0.1}, None)["x"].item() > 0


def _targets_for(loss, rng, shape=(1, 3, 5, 5)):
    target = torch.rand(shape, generator=rng, dtype=torch.float64)
    loss.set_targets(identity_encoder, [target], [1.0])
    return loss


@pytest.mark.parametrize(
    "make",
    [
        lambda: losses.ContentLoss({"x": 1.0}),
        lambda: losses.GramStyleLoss({"x": 1.0}),
        lambda: losses.MRFStyleLoss({"x": 1.0}, patch_size=2),
    ],
    ids=["content", "gram", "mrf"],
)
def test_encoding_loss_gradients_match_finite_differences(make, rng):
    loss = _targets_for(make(), rng)
    features = torch.rand(1, 3, 5, 5, generator=rng, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda f: loss({"x": f}, None)["x"], (features,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("exponent", [2.0, 1.5])
def test_total_variation_gradient_matches_finite_differences(exponent, rng):
    image = torch.rand(1, 3, 5, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: losses.total_variation(x, exponent), (image,), eps=1e-6, atol=1e-6)


def test_objective_gradient_through_encoder_matches_finite_differences(rng):
    encoder = encoders.vgg19(["relu1_1", "relu2_1"], weights="random", pooling="max", seed=0).double()
    objective = losses.PerceptualObjective(
        encoder,
        {
            "content": losses.ContentLoss({"relu2_1": 1.0}),
            "style": losses.GramStyleLoss({"relu1_1": 0.5, "relu2_1": 0.5}, score_weight=10.0),
            "tv": losses.TotalVariationLoss(score_weight=0.1),
        },
    )
    content, style = (torch.rand(1, 3, 6, 6, generator=rng, dtype=torch.float64) for _ in range(2))
    objective.set_targets(content, [style], [1.0])
    image = torch.rand(1, 3, 6, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: objective(x)[0], (image,), eps=1e-6, atol=1e-5, rtol=1e-3)


def test_objective_terms_add_up_and_targets_are_cached(vgg19_random, rng, monkeypatch):
    objective = losses.PerceptualObjective(
        vgg19_random,
        {
            "content": losses.ContentLoss({"relu4_2": 1.0}),
            "style": losses.GramStyleLoss({"relu1_1": 2.0, "relu3_1": 0.5}, score_weight=100.0),
            "tv": losses.TotalVariationLoss(score_weight=3.0),
        },
    )
    content, style = torch.rand(1, 3, 32, 32, generator=rng), torch.rand(1, 3, 32, 32, generator=rng)
    objective.set_targets(content, [style], [1.0])
    calls = []
    monkeypatch.setattr(losses, "gram_matrix", lambda f, real=losses.gram_matrix: calls.append(f.shape) or real(f))
    total, terms = objective(torch.rand(1, 3, 32, 32, generator=rng))
    objective(torch.rand(1, 3, 32, 32, generator=rng))
    assert calls == []  # style target Grams are cached, never recomputed per step
    assert terms["style"].item() == pytest.approx(100 * (2 * terms["style/relu1_1"] + 0.5 * terms["style/relu3_1"]).item(), rel=1e-5)
    assert terms["tv"].item() == pytest.approx(3 * terms["tv/image"].item())
    assert total.item() == pytest.approx((terms["content"] + terms["style"] + terms["tv"]).item(), rel=1e-6)


def test_style_blend_weights(vgg19_random, rng):
    a, b = torch.rand(1, 3, 32, 32, generator=rng), torch.rand(1, 3, 32, 32, generator=rng)
    blended = losses.GramStyleLoss({"relu2_1": 1.0})
    blended.set_targets(vgg19_random, [a, b], [3.0, 1.0])
    ga = losses.gram_matrix(vgg19_random(a, ["relu2_1"])["relu2_1"])
    gb = losses.gram_matrix(vgg19_random(b, ["relu2_1"])["relu2_1"])
    probe = torch.rand(1, 128, 16, 16, generator=rng)
    torch.testing.assert_close(blended({"relu2_1": probe}, None)["relu2_1"], losses.gram_loss(probe, 0.75 * ga + 0.25 * gb))

    image = torch.rand(1, 3, 32, 32, generator=rng)
    features = vgg19_random(image, ["relu3_1"])
    mrf_ab = losses.MRFStyleLoss({"relu3_1": 1.0})
    mrf_ab.set_targets(vgg19_random, [a, b], [3.0, 1.0])
    singles = []
    for style in (a, b):
        mrf = losses.MRFStyleLoss({"relu3_1": 1.0})
        mrf.set_targets(vgg19_random, [style], [1.0])
        singles.append(mrf(features, image)["relu3_1"])
    torch.testing.assert_close(mrf_ab(features, image)["relu3_1"], 0.75 * singles[0] + 0.25 * singles[1])


@pytest.mark.parametrize("bad", [-1.0, float("nan"), float("inf")])
def test_bad_weights_are_refused(bad):
    with pytest.raises(ConfigError, match="weights must be finite numbers >= 0"):
        losses.GramStyleLoss({"relu1_1": bad})
    with pytest.raises(ConfigError, match="score_weight"):
        losses.ContentLoss({"relu4_2": 1.0}, score_weight=bad)


def test_mean_std_loss_hand_computed():
    features = torch.tensor([[1.0, 3.0], [0.0, 4.0]]).view(1, 2, 1, 2)  # μ = (2, 2), var = (1, 4)
    target = torch.tensor([[0.0, 0.0], [2.0, 2.0]]).view(1, 2, 1, 2)  # μ = (0, 2), var = (0, 0)
    loss = losses.MeanStdStyleLoss({"x": 1.0})
    loss.set_targets(identity_encoder, [target], [1.0])
    eps = losses.MEANSTD_EPS
    std, std_t = [math.sqrt(1 + eps), math.sqrt(4 + eps)], [math.sqrt(eps)] * 2
    expected = ((2 - 0) ** 2 + 0) / 2 + sum((s - t) ** 2 for s, t in zip(std, std_t)) / 2
    assert loss({"x": features}, None)["x"].item() == pytest.approx(expected, rel=1e-6)


def test_wasserstein_loss_hand_computed():
    # Uncorrelated channels: W2² = ‖μ - μ_t‖² + Σ_c (σ_c - σ_t,c)², divided by C = 2.
    features = torch.tensor([[1.0, -1, 1, -1], [3, 3, -1, -1]]).view(1, 2, 2, 2)  # μ = (0, 1), σ = (1, 2)
    target = torch.tensor([[4.0, -2, 4, -2], [1, 1, -1, -1]]).view(1, 2, 2, 2)  # μ = (1, 0), σ = (3, 1)
    loss = losses.WassersteinStyleLoss({"x": 1.0})
    loss.set_targets(identity_encoder, [target], [1.0])
    assert loss({"x": features}, None)["x"].item() == pytest.approx((1 + 1 + 4 + 1) / 2, rel=1e-5)


def test_wasserstein_loss_matches_matrix_square_root_formula(rng):
    features, target = (torch.rand(1, 6, 4, 5, generator=rng, dtype=torch.float64) for _ in range(2))
    loss = losses.WassersteinStyleLoss({"x": 1.0})
    loss.set_targets(identity_encoder, [target], [1.0])
    (mean, cov), (mean_t, cov_t) = losses.channel_covariance(features), losses.channel_covariance(target)
    root_t = torch.from_numpy(scipy.linalg.sqrtm(cov_t[0].numpy()).real)
    cross = torch.from_numpy(scipy.linalg.sqrtm((root_t @ cov[0] @ root_t).numpy()).real)
    expected = ((mean - mean_t).square().sum() + torch.trace(cov[0] + cov_t[0] - 2 * cross)) / 6
    assert loss({"x": features}, None)["x"].item() == pytest.approx(expected.item(), rel=1e-8)
    assert loss({"x": target}, None)["x"].item() == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("shape", [(1, 3, 5, 5), (1, 8, 2, 2)], ids=["full-rank", "fewer-positions-than-channels"])
@pytest.mark.parametrize("make", [losses.MeanStdStyleLoss, losses.WassersteinStyleLoss], ids=["meanstd", "w2"])
def test_statistics_losses_gradients_match_finite_differences(make, shape, rng):
    # With 4 positions and 8 channels the covariances are singular: W2's gradient must stay exact.
    loss = _targets_for(make({"x": 1.0}), rng, shape)
    features = torch.rand(shape, generator=rng, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda f: loss({"x": f}, None)["x"], (features,), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("make", [losses.MeanStdStyleLoss, losses.WassersteinStyleLoss], ids=["meanstd", "w2"])
def test_statistics_losses_blend_styles_as_their_pooled_features(make, rng):
    a, b = (torch.rand(1, 4, 3, 5, generator=rng, dtype=torch.float64) for _ in range(2))
    blended, pooled = make({"x": 1.0}), make({"x": 1.0})
    blended.set_targets(identity_encoder, [a, b], [2.0, 2.0])
    pooled.set_targets(identity_encoder, [torch.cat([a, b], dim=-1)], [1.0])
    probe = {"x": torch.rand(1, 4, 6, 6, generator=rng, dtype=torch.float64)}
    assert blended(probe, None)["x"].item() == pytest.approx(pooled(probe, None)["x"].item(), rel=1e-10)


@pytest.mark.parametrize(
    "make",
    [lambda **kw: losses.ContentLoss({"x": 0.3}, score_weight=7.0, **kw),
     lambda **kw: losses.GramStyleLoss({"x": 0.3}, score_weight=7.0, **kw)],
    ids=["content", "gram"],
)
def test_normalized_gradients_have_unit_l1_norm_before_the_weights(make, rng):
    plain, normalized = make(), make(normalize_gradients=True)
    target = torch.rand(1, 4, 5, 6, generator=rng, dtype=torch.float64)
    for loss in (plain, normalized):
        loss.set_targets(identity_encoder, [target], [1.0])
    features = torch.rand(1, 4, 5, 6, generator=rng, dtype=torch.float64, requires_grad=True)
    values = [loss({"x": features}, None) for loss in (plain, normalized)]
    assert values[1]["x"].item() == values[0]["x"].item()  # the value is unchanged
    (grad_plain,), (grad_normalized,) = (torch.autograd.grad(loss.weighted(v), features) for loss, v in zip((plain, normalized), values))
    assert grad_normalized.abs().sum().item() == pytest.approx(0.3 * 7.0, rel=1e-6)  # layer weight × score weight
    torch.testing.assert_close(grad_normalized, grad_plain / grad_plain.abs().sum() * 0.3 * 7.0)


def test_normalize_gradients_must_be_a_bool():
    with pytest.raises(ConfigError, match="normalize_gradients='yes' is not valid: use true or false"):
        losses.ContentLoss({"relu4_2": 1.0}, normalize_gradients="yes")


def test_memory_estimate_counts_statistics_losses(vgg19_random):
    from stx.engine import plan

    layers = {"relu1_1": 1.0, "relu3_1": 1.0}
    shapes = vgg19_random.layer_shapes(64, 64)
    estimates = {}
    for name, loss in [("gram", losses.GramStyleLoss(layers)), ("w2", losses.WassersteinStyleLoss(layers)),
                       ("normalized", losses.GramStyleLoss(layers, normalize_gradients=True))]:
        estimates[name] = plan.estimate_bytes(losses.PerceptualObjective(vgg19_random, {"style": loss}), 64, 64, 2, 1)
    assert "loss statistics" not in estimates["gram"]
    features = sum(math.prod(shapes[layer]) for layer in layers)  # 64·64·64 + 256·16·16
    assert estimates["normalized"]["loss statistics"] == 4 * features
    assert estimates["w2"]["loss statistics"] == 4 * (3 * features + 4 * (64**2 + 256**2))
