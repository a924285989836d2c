"""Loss at equal objective evaluations, side by side in one run: stx's default L-BFGS (through
stx's own optimisation loop), torch.optim.LBFGS as the PyTorch tutorial uses it (one iteration
per step, clamp before each evaluation, no guard), torch.optim.LBFGS with a strong-Wolfe line
search, and Adam at the best of three learning rates.

Same images (the samples), objective (content relu4_2, Gram relu1_1…relu5_1 × score weight) and
number of evaluations for every contender. Weights: HED's trained VGG16 at torchvision's scale
(``hed``) or Caffe's (``hed_caffe``), or random VGG19. Prints, per contender, the lowest loss
after 25/50/100/… evaluations as a fraction of the starting loss, the evaluations whose loss
rose above the lowest so far ("undone": stx keeps the lowest-loss image), and seconds per
evaluation.

    python benchmarks/lbfgs_convergence.py --weights hed --size 256 --evals 100
"""

from __future__ import annotations

import argparse
import functools
import time
from collections.abc import Callable

import torch

from stx.engine import encoders, losses
from stx.engine.image import read_image
from stx.engine.lbfgs import LBFGS
from stx.engine.optim import PyramidLevel, Schedule, optimise_image
from stx.runs.schema import ASSETS_DIR

LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]
ADAM_LRS = (0.01, 0.02, 0.05)


def stx_run(objective, content, style, evals: int, bounds: str) -> None:
    """stx's product path: optimise_image with stx.engine.lbfgs.LBFGS (one evaluation per step)."""
    schedule = Schedule(levels=(PyramidLevel(max(content.shape[-2:]), evals),), init="content", style_scale=1.0,
                        checkpoint_every=0, precision="fp32", seed=0, bounds=bounds, max_rise=0.0,
                        make_optimizer=functools.partial(LBFGS, lr=1.0, history_size=100))
    optimise_image(objective, content=content, styles=[style], style_weights=[1.0], schedule=schedule)


def torch_run(make: Callable, objective, content, evals: int, counted: list) -> None:
    """A plain loop over the pixels with ``clamp`` before each evaluation, as in the tutorial."""
    image = content.clone().requires_grad_(True)
    optimizer = make([image])

    def closure():
        with torch.no_grad():
            image.clamp_(0, 1)
        optimizer.zero_grad()
        total, _ = objective(image)
        total.backward()
        return total

    while len(counted) < evals:
        optimizer.step(closure)
    with torch.no_grad():
        image.clamp_(0, 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--weights", default="hed", choices=["hed", "hed_caffe", "random"])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--evals", type=int, default=100)
    parser.add_argument("--score-weight", type=float, default=1e3, help="the Gram term's score weight")
    args = parser.parse_args()
    content = read_image(ASSETS_DIR / "content.png", args.size)
    style = read_image(ASSETS_DIR / "style.png", args.size)
    arch = "vgg19" if args.weights == "random" else "vgg16"
    encoder = encoders.build_encoder(arch, [*LAYERS, "relu4_2"], weights=args.weights, pooling="max", seed=0)
    objective = losses.PerceptualObjective(encoder, {
        "content": losses.ContentLoss({"relu4_2": 1.0}),
        "style": losses.GramStyleLoss({layer: 0.2 for layer in LAYERS}, args.score_weight),
    })
    objective.set_targets(content, [style], [1.0])
    counted: list[float] = []
    objective.register_forward_hook(lambda module, inputs, output: counted.append(output[0].item()))

    contenders: dict[str, Callable[[], None]] = {
        "stx default (sigmoid)": lambda: stx_run(objective, content, style, args.evals, "sigmoid"),
        "stx L-BFGS, clamp": lambda: stx_run(objective, content, style, args.evals, "clamp"),
        "tutorial (torch L-BFGS)": lambda: torch_run(
            functools.partial(torch.optim.LBFGS, lr=1.0, max_iter=1, history_size=100), objective, content,
            args.evals, counted),
        "torch L-BFGS strong-Wolfe": lambda: torch_run(
            functools.partial(torch.optim.LBFGS, lr=1.0, max_iter=20, history_size=100,
                              line_search_fn="strong_wolfe"), objective, content, args.evals, counted),
        **{f"Adam lr={lr}": functools.partial(
            torch_run, functools.partial(torch.optim.Adam, lr=lr), objective, content, args.evals, counted)
           for lr in ADAM_LRS},
    }
    marks = [m for m in (10, 25, 50, 100, 200, 400, 800) if m <= args.evals]
    print(f"{args.size} px, {args.evals} evaluations, weights={args.weights} ({arch}), "
          f"style score weight {args.score_weight:g}; lowest loss so far ÷ the start")
    results = {}
    for name, run in contenders.items():
        counted.clear()
        started = time.perf_counter()
        run()
        seconds = (time.perf_counter() - started) / len(counted)
        h = counted[: args.evals]
        best = [min(h[: i + 1]) for i in range(len(h))]
        undone = sum(b > a for a, b in zip(best, h[1:]))
        results[name] = best[-1]
        at = "  ".join(f"@{m}: {best[m - 1] / h[0]:.4f}" for m in marks)
        print(f"{name:27s} start {h[0]:.4g}  {at}  | undone {undone}/{len(h)} ({100 * undone / len(h):.0f}%)"
              f"  | {seconds:.3f} s/eval", flush=True)
    adam = min((v, k) for k, v in results.items() if k.startswith("Adam"))
    print(f"best Adam: {adam[1]}; stx default ÷ best other contender at {args.evals}: "
          f"{results['stx default (sigmoid)'] / min(v for k, v in results.items() if k != 'stx default (sigmoid)'):.3f}")


if __name__ == "__main__":
    main()
