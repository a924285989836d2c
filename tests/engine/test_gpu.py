"""The GPU code paths: reduced precision (CUDA autocast), CUDA memory figures, device tags.

What can run on the CPU does (the fp32 islands of the losses under autocast); the rest needs a
CUDA device and is skipped on machines without one, such as CI's.
"""

import copy

import pytest
import torch

from stx.engine import losses, optim, plan
from stx.engine.judge import Judge
from stx.engine.lbfgs import LBFGS
from stx.engine.optim import OptimizationCallback, PyramidLevel, Schedule, optimise_image
from stx.runs import monitor, tracking

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine); "
                                "run `pytest tests/engine/test_gpu.py` on a GPU machine")


def large_features(rng: torch.Generator, device: str = "cpu") -> torch.Tensor:
    """``1×8×16×16`` features as large as deep VGG activations get: Gram entries ~1e5, past fp16's 65504."""
    return torch.rand(1, 8, 16, 16, generator=rng).mul_(400).to(device)


def test_gram_matrix_is_computed_in_fp32_from_half_features(rng):
    features = large_features(rng).half()
    naive = torch.bmm(features.flatten(2), features.flatten(2).transpose(1, 2))  # what fp16 would give
    assert torch.isinf(naive).any()
    gram = losses.gram_matrix(features)
    assert gram.dtype == torch.float32 and torch.isfinite(gram).all()
    torch.testing.assert_close(gram, losses.gram_matrix(features.float()), rtol=1e-6, atol=0)


def test_gram_matrix_leaves_autocast_for_its_product(rng):
    features = large_features(rng)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        gram = losses.gram_matrix(features)
    assert gram.dtype == torch.float32
    torch.testing.assert_close(gram, losses.gram_matrix(features), rtol=1e-6, atol=0)


class Totals(OptimizationCallback):
    def __init__(self):
        self.totals = []

    def on_step(self, info):
        self.totals.append(info.values["total"])


def optimise_on(device, precision, encoder, rng, steps=12, optimizer=torch.optim.LBFGS, cuda_graph=True, lr=1.0):
    """A small Gram + content job on ``device`` in ``precision``: its image and per-step totals."""
    objective = losses.PerceptualObjective(copy.deepcopy(encoder).to(device), {
        "content": losses.ContentLoss({"relu3_1": 1.0}),
        "style": losses.GramStyleLoss({"relu1_1": 1.0, "relu2_1": 1.0, "relu3_1": 1.0}, score_weight=1e3),
    })
    content, style = (torch.rand(1, 3, 48, 48, generator=rng).to(device) for _ in range(2))
    extra = {"max_iter": 1} if optimizer is torch.optim.LBFGS else {}
    schedule = Schedule(levels=(PyramidLevel(48, steps),), make_optimizer=lambda params: optimizer(params, lr=lr, **extra),
                        init="content", bounds="sigmoid", max_rise=2.0, style_scale=1.0, checkpoint_every=0,
                        precision=precision, seed=0, cuda_graph=cuda_graph)
    recorder = Totals()
    image = optimise_image(objective, content=content, styles=[style], style_weights=[1.0], schedule=schedule,
                           callback=recorder)
    return image, recorder.totals


@needs_cuda
@pytest.mark.parametrize("optimizer", [torch.optim.LBFGS, LBFGS], ids=["torch-lbfgs", "stx-lbfgs"])
def test_cuda_fp32_job_follows_the_cpu_job(vgg19_random, monkeypatch, optimizer):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # fp32 arithmetic, as on the CPU
    _, on_cpu = optimise_on("cpu", "fp32", vgg19_random, torch.Generator().manual_seed(0), optimizer=optimizer)
    _, on_cuda = optimise_on("cuda", "fp32", vgg19_random, torch.Generator().manual_seed(0), optimizer=optimizer,
                             cuda_graph=False)
    # other reduction orders: close, not equal
    torch.testing.assert_close(torch.tensor(on_cuda[:6]), torch.tensor(on_cpu[:6]), rtol=1e-3, atol=0)


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "bf16"])
@pytest.mark.parametrize("lr", [1.0, 20.0], ids=["lr1", "lr20-rises"])
def test_cuda_graph_replays_the_same_steps(vgg19_random, monkeypatch, precision, lr):
    # lr=20 overshoots, so the rise guard undoes steps and restarts the history between replays
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)  # no TF32 algorithm picked differently while recording
    restarts = []
    monkeypatch.setattr(optim, "restart", lambda optimizer: (restarts.append(1), LBFGS.reset(optimizer)))
    runs = {}
    for graph in (False, True):
        restarts.clear()
        runs[graph] = (*optimise_on("cuda", precision, vgg19_random, torch.Generator().manual_seed(0), steps=25,
                                    optimizer=LBFGS, cuda_graph=graph, lr=lr), len(restarts))
    (_, totals, restarted), (_, graphed_totals, graphed_restarted) = runs[False], runs[True]
    # the same arithmetic up to cuDNN's choice of algorithms: the first steps agree closely, and
    # the trajectories end close
    torch.testing.assert_close(torch.tensor(graphed_totals[:4]), torch.tensor(totals[:4]), rtol=1e-4, atol=0)
    assert abs(graphed_totals[-1] - totals[-1]) < 0.05 * totals[-1], (graphed_totals, totals)
    assert graphed_totals[-1] < 0.5 * graphed_totals[0]
    assert (graphed_restarted > 0) == (restarted > 0) == (lr > 1), (graphed_restarted, restarted)


@needs_cuda
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_reduced_precision_job_converges(vgg19_random, precision):
    image, totals = optimise_on("cuda", precision, vgg19_random, torch.Generator().manual_seed(0), steps=20)
    _, reference = optimise_on("cuda", "fp32", vgg19_random, torch.Generator().manual_seed(0), steps=20)
    assert all(map(torch.isfinite, torch.tensor(totals))), totals
    assert totals[-1] < 0.5 * totals[0], totals
    assert totals[-1] < 2 * reference[-1], (totals[-1], reference[-1])
    assert image.dtype == torch.float32 and 0 <= image.min() and image.max() <= 1


@needs_cuda
def test_judge_ignores_the_runs_precision_on_cuda(vgg19_random, rng):
    scorer = Judge(copy.deepcopy(vgg19_random).to("cuda"), size=64)
    content, style = (torch.rand(1, 3, 64, 64, generator=rng).cuda() for _ in range(2))
    scorer.set_references(content, [style])
    image = torch.rand(1, 3, 64, 64, generator=rng).cuda()
    with torch.autocast("cuda", dtype=torch.float16):
        under_autocast = scorer(image)
    assert under_autocast == scorer(image)


@needs_cuda
def test_cuda_memory_figures_and_device_tags():
    device = torch.device("cuda")
    free, total = torch.cuda.mem_get_info(device)
    assert 0 < plan.available_bytes(device) <= total
    block = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    assert monitor.peak_memory_bytes(device) >= block.numel()
    assert tracking.device_tags(device)["device.name"] == torch.cuda.get_device_name(device)


@needs_cuda
def test_a_bank_on_the_gpu_takes_the_steps_each_run_takes_alone():
    from test_lbfgs import test_runs_of_a_bank_take_the_steps_each_takes_alone as bank_test

    bank_test(device="cuda")
