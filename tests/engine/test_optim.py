import copy
import functools

import pytest
import torch

import stx.engine.lbfgs
from stx.engine import losses
from stx.engine.optim import OptimizationCallback, PyramidLevel, Schedule, optimise_image
from stx.errors import ConfigError, NonFiniteLossError

LBFGS = functools.partial(stx.engine.lbfgs.LBFGS, lr=1.0)
TORCH_LBFGS = functools.partial(torch.optim.LBFGS, lr=1.0, max_iter=1)
ADAM = functools.partial(torch.optim.Adam, lr=0.02)


def schedule(levels=(PyramidLevel(32, 8),), optimizer=LBFGS, **overrides):
    """A Schedule with the shipped defaults (conf/schedule/_base.yaml), changed by ``overrides``."""
    settings = dict(init="content", bounds="clamp", max_rise=2.0, style_scale=1.0, checkpoint_every=0, precision="fp32", seed=0)
    return Schedule(levels=levels, make_optimizer=optimizer, **{**settings, **overrides})


class Recorder(OptimizationCallback):
    """Keeps every step's info and every checkpoint."""

    def __init__(self):
        self.steps, self.checkpoints, self.events = [], [], []

    def on_start(self):
        self.events.append("start")

    def on_step(self, info):
        self.steps.append(info)
        self.events.append(info.step)

    def on_checkpoint(self, checkpoint):
        self.checkpoints.append(copy.deepcopy(checkpoint))


def run(encoder, loss_set, rng, levels=(PyramidLevel(32, 8),), optimizer=LBFGS, **settings):
    objective = losses.PerceptualObjective(encoder, loss_set)
    content, style = torch.rand(1, 3, 40, 40, generator=rng), torch.rand(1, 3, 40, 40, generator=rng)
    recorder = Recorder()
    out = optimise_image(objective, content=content, styles=[style], style_weights=[1.0],
                         schedule=schedule(levels, optimizer, **settings), callback=recorder)
    return out, [info.values["total"] for info in recorder.steps], recorder


@pytest.mark.parametrize(
    "name,make,optimizer,init",
    [
        ("content", lambda: losses.ContentLoss({"relu4_2": 1.0}), LBFGS, "random"),
        ("gram", lambda: losses.GramStyleLoss({"relu1_1": 1.0, "relu2_1": 1.0}, score_weight=1e3), LBFGS, "content"),
        ("mrf", lambda: losses.MRFStyleLoss({"relu3_1": 1.0}), ADAM, "content"),
        ("tv", lambda: losses.TotalVariationLoss(), ADAM, "random"),
    ],
)
def test_each_loss_falls(vgg19_random, rng, name, make, optimizer, init):
    out, history, _ = run(vgg19_random, {name: make()}, rng, optimizer=optimizer, init=init)
    assert len(history) == 8
    assert history[-1] < 0.8 * history[0], history
    assert out.shape == (1, 3, 32, 32) and out.min() >= 0 and out.max() <= 1


def test_pyramid_runs_levels_coarse_to_fine(vgg19_random, rng):
    out, history, recorder = run(
        vgg19_random,
        {"style": losses.GramStyleLoss({"relu2_1": 1.0}, score_weight=1e3)},
        rng,
        levels=(PyramidLevel(16, 3), PyramidLevel(40, 4)),
    )
    seen = [(info.step, info.level, tuple(info.image.shape[-2:])) for info in recorder.steps]
    assert seen == [(1, 0, (16, 16)), (2, 0, (16, 16)), (3, 0, (16, 16))] + [(s, 1, (40, 40)) for s in range(4, 8)]
    assert out.shape == (1, 3, 40, 40)


def test_same_seed_gives_same_image(vgg19_random):
    terms = lambda: {"style": losses.GramStyleLoss({"relu1_1": 1.0, "relu3_1": 1.0}, score_weight=1e3)}
    a, _, _ = run(vgg19_random, terms(), torch.Generator().manual_seed(5), init="random", seed=7)
    b, _, _ = run(vgg19_random, terms(), torch.Generator().manual_seed(5), init="random", seed=7)
    c, _, _ = run(vgg19_random, terms(), torch.Generator().manual_seed(5), init="random", seed=8)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


class Chunked(Recorder):
    """A recorder that needs no step's image: steps come in chunks, read back once each."""

    def needs_image(self, step):
        return False


@pytest.mark.parametrize("max_rise,callback", [(2.0, Recorder), (0.0, Chunked)], ids=["guarded", "chunked"])
def test_non_finite_loss_stops_with_last_finite_image(vgg19_random, rng, max_rise, callback):
    class Explodes(losses.TotalVariationLoss):
        calls = 0

        def forward(self, features, image):
            Explodes.calls += 1
            value = super().forward(features, image)
            return {"image": value["image"] * (float("nan") if Explodes.calls > 3 else 1.0)}

    objective = losses.PerceptualObjective(vgg19_random, {"tv": Explodes()})
    content = torch.rand(1, 3, 40, 40, generator=rng)
    recorder = callback()
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 4.*tv/image") as info:
        optimise_image(objective, content=content, styles=[content], style_weights=[1.0],
                       schedule=schedule(optimizer=ADAM, max_rise=max_rise), callback=recorder)
    assert info.value.step == 4
    assert torch.isfinite(info.value.image).all()
    assert [step.step for step in recorder.steps] == [1, 2, 3]  # the steps before it, never a NaN one


class HostReads:
    """Counts the calls that copy a tensor's value to the host (each waits for the device)."""

    def __init__(self, monkeypatch):
        self.count = 0
        for name in ("item", "tolist", "__bool__", "__float__"):
            original = getattr(torch.Tensor, name)

            def counted(tensor, *args, _original=original, **kwargs):
                self.count += 1
                return _original(tensor, *args, **kwargs)

            monkeypatch.setattr(torch.Tensor, name, counted)


@pytest.mark.parametrize("callback,reads", [(Recorder, 40 + 1), (Chunked, 2 + 1)], ids=["every-step", "chunked"])
def test_steps_are_read_back_in_chunks_with_the_same_values(vgg19_random, monkeypatch, callback, reads):
    terms = {"style": losses.GramStyleLoss({"relu1_1": 1.0, "relu2_1": 1.0}, score_weight=1e3)}
    _, expected, _ = run(vgg19_random, terms, torch.Generator().manual_seed(3), levels=(PyramidLevel(32, 40),), max_rise=0)
    objective = losses.PerceptualObjective(vgg19_random, terms)
    rng = torch.Generator().manual_seed(3)
    content, style = torch.rand(1, 3, 40, 40, generator=rng), torch.rand(1, 3, 40, 40, generator=rng)
    recorder, host = callback(), HostReads(monkeypatch)
    optimise_image(objective, content=content, styles=[style], style_weights=[1.0],
                   schedule=schedule((PyramidLevel(32, 40),), max_rise=0), callback=recorder)
    # L-BFGS's first step reads its gradient's size once; then one read-back per report: 40 steps
    # one by one, or two chunks (32 + the level's last 8)
    assert host.count == reads
    assert [info.values["total"] for info in recorder.steps] == expected
    assert [info.step for info in recorder.steps] == list(range(1, 41))


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"init": "noise"}, r"schedule.init='noise' is not valid; use one of content, random, style"),
        ({"levels": ()}, r"schedule.levels is empty"),
        ({"style_scale": 0.0}, r"schedule.style_scale=0.0 is not valid"),
        ({"style_scale": 27397080.0}, r"schedule.style_scale=27397080.0 makes the style images 876706560 px at the "
                                      r"32 px level, more than stx handles \(8192 px\); use a scale of at most 256"),
        ({"checkpoint_every": -1}, r"schedule.checkpoint_every=-1 is not valid"),
        ({"precision": "fp8"}, r"precision='fp8' is not valid"),
        ({"optimizer": functools.partial(torch.optim.Adam, lr=-1)}, r"schedule.optimizer is not valid: Invalid learning rate"),
        ({"bounds": "tanh"}, r"schedule.bounds='tanh' is not valid; use one of sigmoid, clamp"),
        ({"max_rise": 0.5}, r"schedule.max_rise=0.5 is not valid"),
    ],
)
def test_bad_schedule_values(kwargs, message):
    with pytest.raises(ConfigError, match="steps=-1"):
        PyramidLevel(64, -1)
    with pytest.raises(ConfigError, match=message):
        schedule(**kwargs)


def test_schedule_counts_optimizer_state_for_the_memory_estimate():
    assert schedule(optimizer=functools.partial(torch.optim.LBFGS, history_size=7)).state_images == 2 * 7 + 3 + 2
    assert schedule(optimizer=functools.partial(stx.engine.lbfgs.LBFGS, history_size=7)).state_images == 2 * 7 + 7 + 2
    assert schedule(optimizer=ADAM).state_images == 2 + 2


@pytest.mark.parametrize(
    "optimizer,bounds",
    [(LBFGS, "sigmoid"), (LBFGS, "clamp"), (TORCH_LBFGS, "sigmoid"), (ADAM, "clamp")],
    ids=["lbfgs-sigmoid", "lbfgs-clamp", "torch-lbfgs-sigmoid", "adam"],
)
def test_resume_from_any_checkpoint_matches_uninterrupted_run(vgg19_random, optimizer, bounds):
    objective = losses.PerceptualObjective(
        vgg19_random, {"content": losses.ContentLoss({"relu4_2": 1.0}), "style": losses.GramStyleLoss({"relu1_1": 1.0, "relu2_1": 1.0}, 1e3)}
    )
    generator = torch.Generator().manual_seed(3)
    content, style = torch.rand(1, 3, 40, 40, generator=generator), torch.rand(1, 3, 40, 40, generator=generator)
    levels = (PyramidLevel(16, 4), PyramidLevel(32, 6))

    def optimise(checkpoint_every=0, **kwargs):
        plan = schedule(levels, optimizer, init="random", seed=1, checkpoint_every=checkpoint_every, bounds=bounds)
        return optimise_image(objective, content=content, styles=[style], style_weights=[1.0], schedule=plan, **kwargs)

    recorder = Recorder()
    full = optimise(checkpoint_every=3, callback=recorder)
    assert [(c.step, c.level) for c in recorder.checkpoints] == [(3, 0), (6, 1), (9, 1)]
    assert torch.equal(optimise(), full)  # checkpointing does not change the result
    assert recorder.events[:2] == ["start", 1] and recorder.events.count("start") == 1  # start-up ends here
    for checkpoint in recorder.checkpoints:
        resumed = Recorder()
        assert torch.equal(optimise(start=checkpoint, callback=resumed), full), checkpoint.step
        assert resumed.events[:2] == ["start", checkpoint.step + 1] and resumed.events.count("start") == 1


def gatys_on_samples(size):
    """The default objective (content relu4_2, Gram relu1_1…relu5_1 × 1e3) on the sample images at ``size`` px."""
    from stx.engine import encoders
    from stx.engine.image import read_image
    from stx.runs.schema import ASSETS_DIR

    layers = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
    encoder = encoders.vgg19([*layers, "relu4_2"], weights="random", pooling="max", seed=0)
    objective = losses.PerceptualObjective(
        encoder, {"content": losses.ContentLoss({"relu4_2": 1.0}), "style": losses.GramStyleLoss({l: 0.2 for l in layers}, 1e3)}
    )
    return objective, read_image(ASSETS_DIR / "content.png", size), read_image(ASSETS_DIR / "style.png", size)


def test_lbfgs_run_does_not_depend_on_the_score_weights_scale():
    # the shipped L-BFGS takes the same steps for c × the loss; torch.optim.LBFGS leaves the image
    # where it started once the loss is small enough (here 1e-4 × the defaults: every curvature
    # pair fails its absolute test)
    objective, content, style = gatys_on_samples(48)

    def totals(scale, optimizer):
        for loss in objective.losses.values():
            loss.score_weight *= scale
        try:
            plan = schedule((PyramidLevel(48, 20),), optimizer, bounds="sigmoid")
            recorder = Recorder()
            optimise_image(objective, content=content, styles=[style], style_weights=[1.0], schedule=plan, callback=recorder)
        finally:
            for loss in objective.losses.values():
                loss.score_weight /= scale
        return torch.tensor([info.values["total"] / scale for info in recorder.steps])

    unscaled, scaled = totals(1.0, LBFGS), totals(1e-4, LBFGS)
    assert unscaled[-1] < 0.1 * unscaled[0]
    # the same steps up to float32 rounding, which grows with the steps
    torch.testing.assert_close(scaled[:8], unscaled[:8], rtol=1e-2, atol=0)
    assert abs(scaled[-1] - unscaled[-1]) < 0.05 * unscaled[-1], (scaled, unscaled)
    frozen = totals(1e-4, TORCH_LBFGS)
    assert frozen[-1] > 0.99 * frozen[0]


def test_lbfgs_never_keeps_a_step_that_multiplies_the_loss_and_returns_the_best_image():
    objective, content, style = gatys_on_samples(48)

    def optimise(optimizer=LBFGS, **settings):
        recorder = Recorder()
        out = optimise_image(objective, content=content, styles=[style], style_weights=[1.0],
                             schedule=schedule((PyramidLevel(48, 40),), optimizer, **settings), callback=recorder)
        return out, [info.values["total"] for info in recorder.steps], recorder

    _, unguarded, _ = optimise(TORCH_LBFGS, bounds="clamp", max_rise=0.0)  # the tutorial's loop
    assert max(b / min(unguarded[: i + 1]) for i, b in enumerate(unguarded[1:])) > 2  # it does spike here
    out, guarded, recorder = optimise(bounds="sigmoid", max_rise=2.0)
    assert all(b <= 2.0 * min(guarded[: i + 1]) for i, b in enumerate(guarded[1:]))
    assert min(guarded[:20]) < min(unguarded[:20])  # and gets lower at equal evaluations
    best = min(range(len(guarded)), key=guarded.__getitem__)  # loss of step k is measured before step k
    expected = recorder.steps[best - 1].image if best > 0 else content
    torch.testing.assert_close(out, expected.clamp(0, 1))
