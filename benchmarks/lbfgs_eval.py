"""Seconds per L-BFGS function evaluation: stx vs a plain floor vs pystiche / tutorial approach.

All contenders optimise the same objective on the same 256 px images with randomly
initialised VGG19 weights (timings do not depend on weight values): content loss on
relu4_2, Gram style loss on relu1_1…relu5_1, L-BFGS(lr=1, max_iter=1).

* floor    — one forward + backward of torchvision's VGG19 cut at relu5_1, w.r.t. the input.
* stx      — stx's objective inside L-BFGS (clamp, forward, losses, backward, L-BFGS update).
* pystiche — pystiche 1.0.1's ``image_optimization`` (only if ``import pystiche`` works;
             its 2021 code needs torchvision's removed ``model_urls`` dicts, restored below).
* tutorial — the PyTorch NST tutorial's approach: loss modules inserted into a copy of the
             network, which is cut after the last loss module.

Contenders are timed in interleaved rounds and the median per evaluation is reported.
Usage: python benchmarks/lbfgs_eval.py [--size 256] [--evals 5] [--rounds 5] [--device cpu]
"""

from __future__ import annotations

import argparse
import copy
import functools
import importlib
import statistics
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from stx import encoders, losses
from stx.optim import PyramidLevel, Schedule, optimise_level

CONTENT_LAYER = "relu4_2"
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
STYLE_WEIGHT = 1e3


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def floor_runner(content, style, device):
    features = models.vgg19(weights=None).features[:30].to(device).requires_grad_(False)  # up to relu5_1
    image = content.clone().requires_grad_(True)

    def run(evals: int) -> None:
        for _ in range(evals):
            image.grad = None
            features(image).sum().backward()

    return run


def stx_runner(content, style, device):
    encoder = encoders.vgg19([CONTENT_LAYER, *STYLE_LAYERS], weights="random", pooling="max", seed=0).to(device)
    objective = losses.PerceptualObjective(
        encoder,
        {
            "content": losses.ContentLoss({CONTENT_LAYER: 1.0}),
            "style": losses.GramStyleLoss({layer: 1 / len(STYLE_LAYERS) for layer in STYLE_LAYERS}, STYLE_WEIGHT),
        },
    )
    objective.set_targets(content, [style], [1.0])
    schedule = Schedule(levels=(PyramidLevel(max(content.shape[-2:]), 1),),
                        make_optimizer=functools.partial(torch.optim.LBFGS, lr=1.0, max_iter=1), init="content",
                        bounds="clamp", max_rise=0.0, style_scale=1.0, checkpoint_every=0, precision="fp32", seed=0)

    def run(evals: int) -> None:
        optimise_level(objective, content, schedule=schedule, level=0, steps=evals)

    return run


def import_pystiche():
    alexnet, vgg = importlib.import_module("torchvision.models.alexnet"), importlib.import_module("torchvision.models.vgg")
    alexnet.model_urls = {"alexnet": models.AlexNet_Weights.IMAGENET1K_V1.url}
    vgg.model_urls = {f"vgg{n}{bn}": "" for n in (11, 13, 16, 19) for bn in ("", "_bn")}
    import pystiche  # noqa: F401  (optional: pip install --no-deps pystiche==1.0.1)
    from pystiche import enc, loss, optim

    return enc, loss, optim


def pystiche_runner(content, style, device):
    enc, loss, optim = import_pystiche()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mle = enc.vgg19_multi_layer_encoder(pretrained=False, framework="torch", internal_preprocessing=True)
    perceptual = loss.PerceptualLoss(
        loss.FeatureReconstructionLoss(mle.extract_encoder(CONTENT_LAYER)),
        loss.MultiLayerEncodingLoss(
            mle, STYLE_LAYERS, lambda encoder, w: loss.GramLoss(encoder, score_weight=w), score_weight=STYLE_WEIGHT
        ),
    ).to(device)
    perceptual.set_content_image(content)
    perceptual.set_style_image(style)

    def run(evals: int) -> None:
        optim.image_optimization(content.clone(), perceptual, num_steps=evals, quiet=True)

    return run


class _TutorialContent(nn.Module):
    def __init__(self, target):
        super().__init__()
        self.target, self.loss = target.detach(), None

    def forward(self, x):
        self.loss = F.mse_loss(x, self.target)
        return x


class _TutorialStyle(nn.Module):
    def __init__(self, target):
        super().__init__()
        self.target, self.loss = losses.gram_matrix(target).detach(), None

    def forward(self, x):
        self.loss = F.mse_loss(losses.gram_matrix(x), self.target)
        return x


def tutorial_runner(content, style, device):
    """The PyTorch tutorial: rebuild the network with loss modules after the chosen layers."""
    cnn = models.vgg19(weights=None).features.to(device).eval().requires_grad_(False)
    names = encoders.vgg_layer_names(cnn)
    mean = torch.tensor(encoders.IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(encoders.IMAGENET_STD, device=device).view(1, 3, 1, 1)
    model = nn.Sequential()
    content_losses, style_losses = [], []
    for name, layer in zip(names, copy.deepcopy(cnn)):
        model.add_module(name, nn.ReLU(inplace=False) if isinstance(layer, nn.ReLU) else layer)
        if name == CONTENT_LAYER:
            module = _TutorialContent(model((content - mean) / std))
            model.add_module(f"content_{name}", module)
            content_losses.append(module)
        if name in STYLE_LAYERS:
            module = _TutorialStyle(model((style - mean) / std))
            model.add_module(f"style_{name}", module)
            style_losses.append(module)
        if len(content_losses) == 1 and len(style_losses) == len(STYLE_LAYERS):
            break

    def run(evals: int) -> None:
        image = content.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([image], lr=1.0, max_iter=1)

        def closure():
            with torch.no_grad():
                image.clamp_(0, 1)
            optimizer.zero_grad()
            model((image - mean) / std)
            total = content_losses[0].loss + STYLE_WEIGHT / len(STYLE_LAYERS) * sum(m.loss for m in style_losses)
            total.backward()
            return total

        for _ in range(evals):
            optimizer.step(closure)

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--evals", type=int, default=5, help="evaluations per timed block")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    content = torch.rand(1, 3, args.size, args.size, generator=generator).to(device)
    style = torch.rand(1, 3, args.size, args.size, generator=generator).to(device)

    runners = {"floor": floor_runner, "stx": stx_runner, "pystiche": pystiche_runner, "tutorial": tutorial_runner}
    built = {}
    for name, make in runners.items():
        try:
            built[name] = make(content, style, device)
        except ImportError as exc:
            print(f"{name}: skipped ({exc})")
    for run in built.values():  # warm-up
        run(2)
    times: dict[str, list[float]] = {name: [] for name in built}
    for _ in range(args.rounds):
        for name, run in built.items():
            sync(device)
            start = time.perf_counter()
            run(args.evals)
            sync(device)
            times[name].append((time.perf_counter() - start) / args.evals)

    print(f"\ndevice={device} size={args.size}px threads={torch.get_num_threads()} "
          f"evals/block={args.evals} rounds={args.rounds} torch={torch.__version__}")
    floor = statistics.median(times["floor"])
    print(f"{'contender':<10} {'s/eval (median)':>16} {'min':>8} {'max':>8} {'÷ floor':>8} {'÷ stx':>8}")
    stx = statistics.median(times["stx"])
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<10} {median:>16.4f} {min(values):>8.4f} {max(values):>8.4f} {median / floor:>8.3f} {median / stx:>8.3f}")


if __name__ == "__main__":
    main()
