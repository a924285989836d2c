"""The PyTorch neural-style tutorial's approach, on the objective the benchmarks share.

Loss modules are inserted into a copy of torchvision's VGG19 after the chosen layers and the
network is cut after the last of them; L-BFGS (lr=1, max_iter=1, history 100: one objective
evaluation per step) optimises the pixels, clamped into [0, 1] before each evaluation and after
the run. Objective (as stx's default ``loss=gatys``): content ``mean((F−F̂)²)`` on relu4_2, plus
1e3 × the mean over relu1_1…relu5_1 of the Gram loss ``mean((G−Ĝ)²)``, ``G = FFᵀ/(H·W)``.
Only torch and torchvision are imported.

As a script it is the tutorial *process* of ``benchmarks/whole_process.py``: read the sample
images, build, optimise ``--steps`` evaluations, write the result.

    python benchmarks/tutorial.py [--size 256] [--steps 100] [--output tutorial.png]
"""

from __future__ import annotations

import argparse
import copy
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn
from torchvision import models

from floor import load_samples, write_image

CONTENT_LAYER = "relu4_2"
STYLE_LAYERS = ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")
STYLE_WEIGHT = 1e3
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def gram_matrix(features: torch.Tensor) -> torch.Tensor:
    """``B×C×C`` Gram matrices of ``B×C×H×W`` features, divided by H·W."""
    flat = features.flatten(2)
    return flat @ flat.transpose(1, 2) / flat.shape[-1]


class ContentLoss(nn.Module):
    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target, self.loss = target.detach(), torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.loss = F.mse_loss(x, self.target)
        return x


class StyleLoss(nn.Module):
    def __init__(self, target: torch.Tensor) -> None:
        super().__init__()
        self.target, self.loss = gram_matrix(target).detach(), torch.zeros(())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.loss = F.mse_loss(gram_matrix(x), self.target)
        return x


def layer_names(features: nn.Sequential) -> list:
    """``conv1_1, relu1_1, …, pool1, conv2_1, …`` for a VGG ``features`` stack."""
    names, block, index = [], 1, 1
    for module in features:
        if isinstance(module, nn.MaxPool2d):
            names.append(f"pool{block}")
            block, index = block + 1, 1
        elif isinstance(module, nn.ReLU):
            names.append(f"relu{block}_{index}")
            index += 1
        else:
            names.append(f"conv{block}_{index}")
    return names


def tutorial_runner(content: torch.Tensor, style: torch.Tensor) -> Callable[[int], torch.Tensor]:
    """``run(evals)``: optimise from ``content`` for ``evals`` evaluations with one L-BFGS
    optimiser; returns the image (``1×3×H×W``, [0, 1])."""
    device = content.device
    cnn = models.vgg19(weights=None).features.to(device).eval().requires_grad_(False)
    mean, std = torch.tensor(MEAN, device=device).view(1, 3, 1, 1), torch.tensor(STD, device=device).view(1, 3, 1, 1)
    model, trunk, content_losses, style_losses = nn.Sequential(), nn.Sequential(), [], []
    for name, layer in zip(layer_names(cnn), copy.deepcopy(cnn)):
        layer = nn.ReLU(inplace=False) if isinstance(layer, nn.ReLU) else layer
        model.add_module(name, layer)
        trunk.add_module(name, layer)  # the same layers without loss modules, for the targets
        if name == CONTENT_LAYER:
            content_losses.append(ContentLoss(trunk((content - mean) / std)))
            model.add_module(f"content_{name}", content_losses[-1])
        if name in STYLE_LAYERS:
            style_losses.append(StyleLoss(trunk((style - mean) / std)))
            model.add_module(f"style_{name}", style_losses[-1])
        if len(content_losses) == 1 and len(style_losses) == len(STYLE_LAYERS):
            break

    def run(evals: int) -> torch.Tensor:
        image = content.clone().requires_grad_(True)
        optimizer = torch.optim.LBFGS([image], lr=1.0, max_iter=1, history_size=100)

        def closure() -> torch.Tensor:
            with torch.no_grad():
                image.clamp_(0, 1)
            optimizer.zero_grad()
            model((image - mean) / std)
            total = content_losses[0].loss + STYLE_WEIGHT / len(STYLE_LAYERS) * sum(m.loss for m in style_losses)
            total.backward()
            return total

        for _ in range(evals):
            optimizer.step(closure)
        with torch.no_grad():
            return image.clamp_(0, 1).detach()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="long edge, px")
    parser.add_argument("--steps", type=int, default=100, help="objective evaluations")
    parser.add_argument("--output", type=Path, default=Path("tutorial.png"))
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    content, style = load_samples(args.size, torch.device(args.device))
    write_image(tutorial_runner(content, style)(args.steps), args.output)


if __name__ == "__main__":
    main()
