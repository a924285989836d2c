"""The batch engine alone (:mod:`stx.engine.batching`), side by side in one invocation: ``--runs`` runs
of ``--steps`` L-BFGS steps at ``--size`` px with HED's trained VGG16 (content relu4_2, Gram
relu1_1…relu5_1, each run its own style score weight), three ways:

* alone   — the runs one after another, each in its own optimisation;
* batched — the runs as threads of one :class:`~stx.engine.batching.Batch`, each L-BFGS step its
            run's own (about 60 operations a run and step);
* banked  — the same, their L-BFGS states in one bank and their later steps taken at once
            (:class:`~stx.engine.lbfgs.Bank`; stx's behaviour).

Rounds alternate the order. Reported: the median seconds of each, the ratios, and each run's final
loss relative to its loss alone.

    python benchmarks/batched_engine.py [--size 48] [--steps 20] [--runs 8] [--rounds 3] [--device cpu]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import threading
import time

import torch

from stx.engine import batching, encoders, losses
from stx.engine.image import read_image
from stx.engine.lbfgs import LBFGS
from stx.engine.optim import OptimizationCallback, PyramidLevel, Schedule, StepInfo, optimise_image
from stx.runs.schema import ASSETS_DIR

STYLE_LAYERS = ["relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1"]


class LastLoss(OptimizationCallback):
    def __init__(self) -> None:
        self.total = float("nan")

    def needs_image(self, step: int) -> bool:
        return False

    def on_step(self, info: StepInfo) -> None:
        self.total = info.values["total"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=48, help="long edge, px")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default="hed", choices=["hed", "random"])
    args = parser.parse_args()
    device = torch.device(args.device)
    arch = "vgg16" if args.weights == "hed" else "vgg19"
    encoder = encoders.build_encoder(arch, [*STYLE_LAYERS, "relu4_2"], weights=args.weights, pooling="max",
                                     seed=0).to(device)
    content = read_image(ASSETS_DIR / "content.png", args.size).to(device)
    style = read_image(ASSETS_DIR / "style.png", args.size).to(device)
    schedule = Schedule(levels=(PyramidLevel(args.size, args.steps),), init="content", style_scale=1.0,
                        checkpoint_every=0, precision="fp32", seed=0, bounds="sigmoid", max_rise=0.0,
                        make_optimizer=functools.partial(LBFGS, lr=1.0, history_size=100))
    weights = [10 ** (2 + 4 * index / max(1, args.runs - 1)) for index in range(args.runs)]

    def one(weight: float) -> float:
        objective = losses.PerceptualObjective(encoder, {
            "content": losses.ContentLoss({"relu4_2": 1.0}),
            "style": losses.GramStyleLoss({layer: 1.0 for layer in STYLE_LAYERS}, score_weight=weight),
        })
        last = LastLoss()
        optimise_image(objective, content=content, styles=[style], style_weights=[1.0], schedule=schedule,
                       callback=last)
        return last.total

    def alone() -> list[float]:
        return [one(weight) for weight in weights]

    def together(banked: bool) -> list[float]:
        evaluator = batching.cpu_evaluator(torch.get_num_threads()) if device.type == "cpu" else None
        batch = batching.Batch(evaluator, size=args.runs)
        finals = [float("nan")] * args.runs
        slot = batching.Member.slot
        if not banked:
            batching.Member.slot = lambda self, optimizer, g: None  # each run keeps its own state and steps
        try:
            def member(index: int) -> None:
                batching.use_threads(1)
                with batching.joining(batch):
                    finals[index] = one(weights[index])

            threads = [threading.Thread(target=member, args=(index,)) for index in range(args.runs)]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        finally:
            batching.Member.slot = slot
            if evaluator is not None:
                evaluator.shutdown()
        return finals

    contenders = {"alone": alone, "batched": functools.partial(together, False),
                  "banked": functools.partial(together, True)}
    seconds: dict[str, list[float]] = {name: [] for name in contenders}
    finals: dict[str, list[float]] = {}
    one(weights[0])  # warm-up
    for index in range(args.rounds):
        names = list(contenders) if index % 2 == 0 else list(reversed(contenders))
        for name in names:
            if device.type == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            finals[name] = contenders[name]()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds[name].append(time.perf_counter() - start)
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"{args.runs} runs × {args.steps} L-BFGS steps at {args.size} px, {args.weights} {arch}, {device}, "
          f"{args.rounds} rounds (median seconds; all: {seconds})")
    for name in contenders:
        print(f"  {name:8s} {median[name]:7.2f} s")
    print(f"  batched ÷ alone {median['batched'] / median['alone']:.2f}; banked ÷ alone "
          f"{median['banked'] / median['alone']:.2f}; banked ÷ batched {median['banked'] / median['batched']:.2f}")
    for name in ("batched", "banked"):
        worst = max(abs(b - a) / abs(a) for a, b in zip(finals["alone"], finals[name]))
        print(f"  final losses, {name} vs alone: largest relative difference {worst:.2e}")


if __name__ == "__main__":
    main()
