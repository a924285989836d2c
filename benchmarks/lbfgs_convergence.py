"""Loss at equal objective evaluations: stx's default (its L-BFGS, sigmoid bounds, max_rise guard),
the same with torch.optim.LBFGS (stx's default before stx.lbfgs), and the PyTorch tutorial's
loop (torch.optim.LBFGS, clamp before each evaluation and after each step, no guard).

Same images (the samples), objective (content relu4_2, Gram relu1_1…relu5_1 × 1e3), random
VGG19 weights and number of evaluations for every contender, in alternating order. Prints the
loss after 25/50/100/… evaluations, the number of steps that raised the loss, the largest
factor a step raised it by over the best so far, the final/best loss and seconds per evaluation.

    python benchmarks/lbfgs_convergence.py --size 256 --evals 200
"""

from __future__ import annotations

import argparse
import functools
import time

import torch

from stx import encoders, losses
from stx.image import read_image
from stx.lbfgs import LBFGS
from stx.optim import OptimizationCallback, PyramidLevel, Schedule, optimise_image
from stx.schema import ASSETS_DIR

LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
TORCH_LBFGS = functools.partial(torch.optim.LBFGS, lr=1.0, max_iter=1, history_size=100)
STX_LBFGS = functools.partial(LBFGS, lr=1.0, history_size=100)
CONTENDERS = {
    "tutorial (clamp, no guard)": {"bounds": "clamp", "max_rise": 0.0, "make_optimizer": TORCH_LBFGS},
    "stx default, torch's L-BFGS": {"bounds": "sigmoid", "max_rise": 2.0, "make_optimizer": TORCH_LBFGS},
    "stx default": {"bounds": "sigmoid", "max_rise": 2.0, "make_optimizer": STX_LBFGS},
}


class Losses(OptimizationCallback):
    def __init__(self) -> None:
        self.values: list[float] = []

    def on_step(self, info) -> None:
        self.values.append(info.values["total"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--evals", type=int, default=200)
    args = parser.parse_args()
    content = read_image(ASSETS_DIR / "content.png", args.size)
    style = read_image(ASSETS_DIR / "style.png", args.size)
    encoder = encoders.vgg19([*LAYERS, "relu4_2"], weights="random", pooling="max", seed=0)
    objective = losses.PerceptualObjective(
        encoder, {"content": losses.ContentLoss({"relu4_2": 1.0}), "style": losses.GramStyleLoss({l: 0.2 for l in LAYERS}, 1e3)}
    )
    marks = [m for m in (25, 50, 100, 200, 400, 800) if m <= args.evals]
    print(f"{args.size} px, {args.evals} evaluations (L-BFGS lr=1, one evaluation per step, history 100), random VGG19 weights")
    names = list(CONTENDERS)
    for name in names + names[::-1][1:]:  # alternating order; the middle one runs once
        schedule = Schedule(levels=(PyramidLevel(args.size, args.evals),), init="content", style_scale=1.0,
                            checkpoint_every=0, precision="fp32", seed=0, **CONTENDERS[name])
        record = Losses()
        started = time.perf_counter()
        optimise_image(objective, content=content, styles=[style], style_weights=[1.0], schedule=schedule, callback=record)
        seconds = (time.perf_counter() - started) / args.evals
        h = record.values
        rises = [b / min(h[: i + 1]) for i, b in enumerate(h[1:])]
        at = "  ".join(f"@{m}: {h[m - 1]:.4g}" for m in marks)
        print(f"{name:28s} {at}  | steps raising the loss: {sum(b > a for a, b in zip(h, h[1:]))}"
              f"  worst rise over best: x{max(rises):.2f}  best {min(h):.4g}  | {seconds:.3f} s/eval")


if __name__ == "__main__":
    main()
