"""Runs sharing one encoder pass (stx.engine.batching) follow the trajectories they follow alone."""

import functools
import math
import threading

import pytest
import torch

from stx.engine import batching, lbfgs, losses, optim
from stx.engine.optim import PyramidLevel, optimise_image
from stx.errors import NonFiniteLossError

from test_optim import ADAM, LBFGS, Recorder, schedule

SIZE = 32
LBFGS_RISING_LR = 2.0
"""An L-BFGS run whose rise guard (``max_rise=1.0001``) takes steps back: trials that overshoot rise."""


def images(seed):
    rng = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, 40, 40, generator=rng), torch.rand(1, 3, 40, 40, generator=rng)


LBFGS_AGREEMENT = 1e-4
"""How closely an L-BFGS run's losses agree batched and alone (float32 rounding of the batched pass)."""
ADAM_AGREEMENT = 2e-3
"""The same for Adam: it divides each pixel's step by its gradient's running size, so rounding in the batched
pass moves pixels whose gradients are nearly 0 by up to lr, and its runs agree less closely (seen: 2.8e-4 and
3.0e-4 on AMD EPYCs, in both tests that batch an Adam run)."""


def objective(encoder, style_weight, relative=False):
    return losses.PerceptualObjective(encoder, {
        "content": losses.ContentLoss({"relu2_1": 1.0}, relative=relative),
        "style": losses.GramStyleLoss({"relu1_1": 1.0, "relu2_1": 0.5}, score_weight=style_weight, relative=relative),
    })


def run_one(encoder, setting, results, index):
    """One run of ``setting`` (``style_weight``, ``seed`` of its images, schedule overrides); its
    totals per step, or the error it raised, land in ``results[index]``."""
    weight, seed, overrides = setting
    content, style = images(seed)
    if overrides.pop("poisoned", False):
        content[..., :4, :4] = math.nan  # the content loss turns NaN at the first step
    recorder = Recorder()
    try:
        optimise_image(objective(encoder, weight), content=content, styles=[style], style_weights=[1.0],
                       schedule=schedule(**overrides), callback=recorder)
        results[index] = [info.values["total"] for info in recorder.steps]
    except BaseException as exc:  # noqa: BLE001 — the test looks at it
        results[index] = exc


def run_batched(encoder, settings, batch=None):
    batch = batch or batching.Batch()
    results = [None] * len(settings)

    def member(index):
        with batching.joining(batch):
            run_one(encoder, settings[index], results, index)

    threads = [threading.Thread(target=member, args=(index,)) for index in range(len(settings))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results, batch


def run_alone(encoder, settings):
    results = [None] * len(settings)
    for index in range(len(settings)):
        run_one(encoder, settings[index], results, index)
    return results


@pytest.mark.parametrize("optimizer, encoder_thread", [(LBFGS, False), (ADAM, False), (LBFGS, True)],
                         ids=["lbfgs", "adam", "lbfgs-encoder-thread"])
def test_each_run_of_a_batch_follows_its_trajectory_alone(vgg19_random, optimizer, encoder_thread, monkeypatch):
    passes_ran_in = set()
    evaluate_together = batching.evaluate_together
    monkeypatch.setattr(batching, "evaluate_together",
                        lambda *args: (passes_ran_in.add(threading.current_thread().name), evaluate_together(*args)))
    scored_together, built = [], []
    monkeypatch.setattr(batching.ScoredTogether, "__call__", lambda self, features, call=batching.ScoredTogether.__call__:
                        (scored_together.append(len(self.objectives)), call(self, features))[1])
    monkeypatch.setattr(batching.ScoredTogether, "__init__", lambda self, objectives, init=batching.ScoredTogether.__init__:
                        (built.append(len(objectives)), init(self, objectives))[1])
    stepped_together = []
    monkeypatch.setattr(lbfgs.Bank, "later_steps", lambda self, arrivals, step=lbfgs.Bank.later_steps:
                        (stepped_together.append(len(arrivals)), step(self, arrivals))[1])
    settings = [(weight, seed, dict(optimizer=optimizer, max_rise=0)) for weight, seed in [(1e2, 0), (1e4, 1), (1e6, 2)]]
    alone = run_alone(vgg19_random, settings)
    evaluator = batching.cpu_evaluator(torch.get_num_threads()) if encoder_thread else None
    together, batch = run_batched(vgg19_random, settings, batching.Batch(evaluator))
    if evaluator is not None:
        evaluator.shutdown()
        assert {name.split("_")[0] for name in passes_ran_in} == {"stx-encoder"}
    assert batch.evaluations == 8  # three runs of 8 steps in 8 shared passes, not 24
    assert scored_together == [3] * 8 and built == [3]  # scored together in each, their targets stacked once
    # L-BFGS: each run's first step its own, the 7 later ones taken for the three runs at once
    assert stepped_together == ([3] * 7 if optimizer is LBFGS else [])
    tolerance = ADAM_AGREEMENT if optimizer is ADAM else LBFGS_AGREEMENT
    for single, batched in zip(alone, together):
        assert len(batched) == 8
        assert batched == pytest.approx(single, rel=tolerance)
    assert len({tuple(run) for run in together}) == 3  # the runs did not mix


def test_runs_of_different_sizes_and_levels_share_only_equal_shapes(vgg19_random):
    pyramid = dict(levels=(PyramidLevel(16, 3), PyramidLevel(SIZE, 4)))
    settings = [(1e3, 0, pyramid), (1e3, 1, dict(levels=(PyramidLevel(SIZE, 6),))), (1e5, 2, pyramid)]
    alone = run_alone(vgg19_random, settings)
    together, _ = run_batched(vgg19_random, settings)
    for single, batched in zip(alone, together):
        assert batched == pytest.approx(single, rel=1e-4)


def test_a_rise_guard_stop_and_a_nan_stay_in_their_runs(vgg19_random, monkeypatch):
    restarted = []
    monkeypatch.setattr(optim, "restart", lambda optimizer, restart=optim.restart:
                        (restarted.append(optimizer.defaults["lr"]), restart(optimizer))[1])
    adam_rising = dict(optimizer=lambda params: torch.optim.Adam(params, lr=0.5), max_rise=1.05)
    lbfgs_rising = dict(optimizer=functools.partial(lbfgs.LBFGS, lr=LBFGS_RISING_LR), max_rise=1.0001)
    settings = [(1e4, 0, adam_rising), (1e4, 1, dict(poisoned=True)), (1e4, 2, {}), (1e4, 3, lbfgs_rising)]
    alone = run_alone(vgg19_random, [(w, s, dict(o)) for w, s, o in settings])
    guarded_alone, restarted[:] = sorted(restarted), []
    together, _ = run_batched(vgg19_random, settings)
    assert isinstance(alone[1], NonFiniteLossError) and isinstance(together[1], NonFiniteLossError)
    assert together[1].step == alone[1].step
    for index, tolerance in ((0, ADAM_AGREEMENT), (2, LBFGS_AGREEMENT), (3, LBFGS_AGREEMENT)):
        assert together[index] == pytest.approx(alone[index], rel=tolerance)
    assert together[0] != pytest.approx(together[2])  # the guard took steps back in run 0 only
    # the L-BFGS run's guard fired as often batched as alone (its state restarted in the bank)
    assert sorted(restarted) == guarded_alone and guarded_alone.count(LBFGS_RISING_LR) >= 1


def test_stop_ends_every_run_at_its_next_evaluation(vgg19_random):
    class Stop(KeyboardInterrupt):
        pass

    batch = batching.Batch()
    long = dict(levels=(PyramidLevel(SIZE, 10_000),))
    stopper = threading.Timer(0.5, batch.stop, args=(Stop,))
    stopper.start()
    results, _ = run_batched(vgg19_random, [(1e3, seed, long) for seed in range(3)], batch)
    assert all(isinstance(result, Stop) for result in results)


def test_reserve_waits_while_the_memory_is_held():
    batch = batching.Batch()
    free = lambda device: 100
    order = []

    def hold(name, needed, seconds):
        with batch.reserve(needed, torch.device("cpu"), free):
            order.append(f"{name} in")
            threading.Event().wait(seconds)
            order.append(f"{name} out")

    first = threading.Thread(target=hold, args=("a", 60, 0.3))
    first.start()
    threading.Event().wait(0.1)
    hold("b", 60, 0)  # 60 + 60 > 100: waits for a
    first.join()
    assert order == ["a in", "a out", "b in", "b out"]


def test_runs_with_the_same_terms_are_scored_together_as_each_alone(vgg19_random):
    """One scoring for three runs' objectives (their weights and targets differ) gives each run the
    total, values and gradient its own objective gives it from the same batched encoder pass, relative
    (each run's layer values divided by its own targets' magnitudes) or not."""
    runs = [(objective(vgg19_random, weight, relative), *images(seed))
            for weight, seed, relative in [(1e2, 0, True), (1e4, 1, False), (1e6, 2, True)]]
    for run_objective, content, style in runs:
        run_objective.set_targets(content, [style], [1.0])
    objectives = [run_objective for run_objective, _, _ in runs]
    points = [torch.rand(1, 3, 40, 40, generator=torch.Generator().manual_seed(10 + index), requires_grad=True)
              for index in range(len(runs))]

    def features():
        return vgg19_random(torch.cat(points), objectives[0].layers)

    shared, alone = features(), []
    for index, (run_objective, point) in enumerate(zip(objectives, points)):
        total, values = run_objective.score({layer: value[index:index + 1] for layer, value in shared.items()}, point)
        (gradient,) = torch.autograd.grad(total, point, retain_graph=True)
        alone.append((total.item(), {name: value.item() for name, value in values.items()}, gradient))
    assert batching.ScoredTogether.applies(objectives)
    scored = batching.ScoredTogether(objectives)
    totals, values = scored(features())
    gradients = torch.autograd.grad(totals.sum(), points)
    for index, (total, single_values, gradient) in enumerate(alone):
        assert totals[index].item() == pytest.approx(total, rel=1e-5)
        assert {name: value[index].item() for name, value in values.items()} == pytest.approx(single_values, rel=1e-5)
        torch.testing.assert_close(gradients[index], gradient, rtol=1e-4, atol=1e-6 * gradient.abs().max().item())
    for index, run_objective in enumerate(objectives):  # each run's targets are now views of the stacked ones
        assert run_objective.losses["style"].targets["relu1_1"]._base is scored.targets["style"]["relu1_1"]
        assert run_objective.score({layer: value[index:index + 1] for layer, value in shared.items()},
                                   points[index])[0].item() == pytest.approx(alone[index][0], rel=1e-6)


def test_runs_whose_terms_differ_are_scored_one_by_one(vgg19_random):
    def with_targets(loss_terms):
        made = losses.PerceptualObjective(vgg19_random, loss_terms)
        made.set_targets(*images(0)[:1], [images(0)[1]], [1.0])
        return made

    same = with_targets({"content": losses.ContentLoss({"relu2_1": 1.0}), "style": losses.GramStyleLoss({"relu1_1": 1.0})})
    other_layers = with_targets({"content": losses.ContentLoss({"relu2_1": 1.0}), "style": losses.GramStyleLoss({"relu2_1": 1.0})})
    normalized = with_targets({"content": losses.ContentLoss({"relu2_1": 1.0}),
                               "style": losses.GramStyleLoss({"relu1_1": 1.0}, normalize_gradients=True)})
    with_tv = with_targets({"content": losses.ContentLoss({"relu2_1": 1.0}), "tv": losses.TotalVariationLoss()})
    assert batching.ScoredTogether.applies([same, same])
    for different in (other_layers, normalized, with_tv):
        assert not batching.ScoredTogether.applies([same, different])


def test_a_batched_runs_checkpoint_holds_its_own_state_and_resumes_alone_to_its_steps(vgg19_random):
    runs = [(1e3, 0), (1e5, 1)]
    recorders = [Recorder() for _ in runs]
    batch = batching.Batch()

    def member(index):
        weight, seed = runs[index]
        content, style = images(seed)
        with batching.joining(batch):
            optimise_image(objective(vgg19_random, weight), content=content, styles=[style], style_weights=[1.0],
                           schedule=schedule(checkpoint_every=4), callback=recorders[index])

    threads = [threading.Thread(target=member, args=(index,)) for index in range(len(runs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for (weight, seed), recorder in zip(runs, recorders):
        checkpoint = recorder.checkpoints[0]  # at step 4 of 8
        history = checkpoint.optimizer_state["state"][0]["history"]
        assert history.untyped_storage().nbytes() == history.numel() * history.element_size()  # not the bank's
        resumed = Recorder()
        content, style = images(seed)
        optimise_image(objective(vgg19_random, weight), content=content, styles=[style], style_weights=[1.0],
                       schedule=schedule(checkpoint_every=4), callback=resumed, start=checkpoint)
        assert [info.values["total"] for info in resumed.steps] == pytest.approx(
            [info.values["total"] for info in recorder.steps[4:]], rel=1e-4)


def test_runs_with_other_history_sizes_keep_banks_of_their_own_sized_for_them(vgg19_random, monkeypatch):
    banks = []
    monkeypatch.setattr(lbfgs.Bank, "__init__", lambda self, capacity, history_size, g, init=lbfgs.Bank.__init__:
                        (banks.append((history_size, capacity)), init(self, capacity, history_size, g))[1])
    sized = lambda history: dict(optimizer=functools.partial(lbfgs.LBFGS, lr=1.0, history_size=history))
    settings = [(1e3, 0, sized(5)), (1e4, 1, sized(7)), (1e5, 2, sized(5))]
    alone = run_alone(vgg19_random, [(w, s, dict(o)) for w, s, o in settings])
    together, _ = run_batched(vgg19_random, settings)
    assert sorted(banks) == [(5, 2), (7, 1)]  # no slot for a run that cannot use it
    for single, batched in zip(alone, together):
        assert batched == pytest.approx(single, rel=1e-4)
