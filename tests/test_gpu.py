"""The GPU code paths: reduced precision (CUDA autocast), CUDA memory figures, device tags.

What can run on the CPU does (the fp32 islands of the losses under autocast); the rest needs a
CUDA device and is skipped on machines without one, such as CI's.
"""

import copy

import pytest
import torch

from stx import losses, memory, monitor, tracking
from stx.judge import Judge
from stx.optim import OptimizationCallback, PyramidLevel, Schedule, optimise_image

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none on this machine); "
                                "run `pytest tests/test_gpu.py` on a GPU machine")


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


def optimise_on(device, precision, encoder, rng, steps=12):
    """A small Gram + content job on ``device`` in ``precision``: its image and per-step totals."""
    objective = losses.PerceptualObjective(copy.deepcopy(encoder).to(device), {
        "content": losses.ContentLoss({"relu3_1": 1.0}),
        "style": losses.GramStyleLoss({"relu1_1": 1.0, "relu2_1": 1.0, "relu3_1": 1.0}, score_weight=1e3),
    })
    content, style = (torch.rand(1, 3, 48, 48, generator=rng).to(device) for _ in range(2))
    schedule = Schedule(levels=(PyramidLevel(48, steps),), make_optimizer=lambda params: torch.optim.LBFGS(params, lr=1.0, max_iter=1),
                        init="content", bounds="sigmoid", max_rise=2.0, style_scale=1.0, checkpoint_every=0,
                        precision=precision, seed=0)
    recorder = Totals()
    image = optimise_image(objective, content=content, styles=[style], style_weights=[1.0], schedule=schedule,
                           callback=recorder)
    return image, recorder.totals


@needs_cuda
def test_cuda_fp32_job_follows_the_cpu_job(vgg19_random):
    _, on_cpu = optimise_on("cpu", "fp32", vgg19_random, torch.Generator().manual_seed(0))
    _, on_cuda = optimise_on("cuda", "fp32", vgg19_random, torch.Generator().manual_seed(0))
    # cuDNN's TF32 convolutions and other reduction orders: close, not equal
    torch.testing.assert_close(torch.tensor(on_cuda[:4]), torch.tensor(on_cpu[:4]), rtol=2e-2, atol=0)


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
    assert 0 < memory.available_bytes(device) <= total
    block = torch.empty(64 << 20, dtype=torch.uint8, device=device)
    assert monitor.peak_memory_bytes(device) >= block.numel()
    assert tracking.device_tags(device)["device.name"] == torch.cuda.get_device_name(device)
