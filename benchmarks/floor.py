"""The floor every contender is measured against, and the image I/O of the benchmark processes.

The floor is one forward + backward pass of torchvision's VGG19 cut at relu5_1 (random
weights; timings do not depend on weight values) w.r.t. the input image: the least work any
Gatys-style objective on those layers must do per evaluation. This module imports only torch
and torchvision and runs on Python 3.10 with torch 1.12 too (the pystiche peer venv, see
``benchmarks/peer_venv.sh``), so each torch version gets its own floor.

As a script it is the floor *process* of ``benchmarks/whole_process.py``: it reads the two
sample images, builds the network and runs ``--steps`` passes, nothing else.

    python benchmarks/floor.py [--size 256] [--steps 100]
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable, Tuple

import torch
import torch.nn.functional as F
from torchvision import models
from torchvision.io import ImageReadMode, read_image, write_png

SAMPLES = Path(__file__).resolve().parents[1] / "stx" / "assets"
RELU5_1 = 30
"""``vgg19().features[:RELU5_1]`` ends with relu5_1."""


def load_image(path: Path, size: int, device: torch.device) -> torch.Tensor:
    """``path`` as a ``1×3×H×W`` float image in [0, 1] with a long edge of ``size`` px
    (bicubic, antialiased, the aspect ratio kept as stx does)."""
    image = read_image(str(path), ImageReadMode.RGB).unsqueeze(0).float() / 255
    scale = size / max(image.shape[-2:])
    shape = [max(1, round(edge * scale)) for edge in image.shape[-2:]]
    return F.interpolate(image, size=shape, mode="bicubic", align_corners=False, antialias=True).clamp_(0, 1).to(device)


def load_samples(size: int, device: torch.device) -> Tuple[torch.Tensor, torch.Tensor]:
    """stx's sample content and style images at ``size`` px (long edge), on ``device``."""
    return load_image(SAMPLES / "content.png", size, device), load_image(SAMPLES / "style.png", size, device)


def write_image(image: torch.Tensor, path: Path) -> None:
    """Write a ``1×3×H×W`` image in [0, 1] as an 8-bit PNG."""
    write_png((image[0].detach().clamp(0, 1) * 255).round().to(torch.uint8).cpu(), str(path))


def floor_runner(content: torch.Tensor) -> Callable[[int], None]:
    """``run(evals)``: ``evals`` forward + backward passes of VGG19 up to relu5_1 w.r.t. an image
    of ``content``'s shape and device."""
    features = models.vgg19(weights=None).features[:RELU5_1].to(content.device).requires_grad_(False)
    image = content.clone().requires_grad_(True)

    def run(evals: int) -> None:
        for _ in range(evals):
            image.grad = None
            features(image).sum().backward()

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="long edge, px")
    parser.add_argument("--steps", type=int, default=100, help="forward + backward passes")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    content, _ = load_samples(args.size, torch.device(args.device))
    floor_runner(content)(args.steps)


if __name__ == "__main__":
    main()
