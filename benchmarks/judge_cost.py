"""Cost of the quality judge (stx/engine/judge.py) against the default run it scores, side by side.

The run: the default job (256 px, L-BFGS, content relu4_2 + Gram relu1_1…relu5_1, random VGG19
weights, sample images), its seconds per step scaled to ``--run-steps``. The judge:
``set_references`` once per run, plus one evaluation every ``--image-every`` steps and one at
the end (default: 200 / 50 + 1 = 5). Each of ``--rounds`` rounds times ``--steps`` optimiser
steps, one ``set_references`` and one evaluation back to back (the machines are shared: short
alternating blocks see the same load); medians are reported, in wall-clock seconds and, on the
CPU, in process CPU seconds (less sensitive to other processes). Target: the judge costs < 2%
of the run.
Usage: python benchmarks/judge_cost.py [--steps 4] [--rounds 10] [--run-steps 200] [--image-every 50]
                                      [--judge-size 224] [--device auto]
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time

import torch
from hydra import compose, initialize_config_dir

from stx.runs.job import build_job
from stx.engine.judge import EVAL_SIZE
from stx.runs.job import build_judge
from stx.engine.optim import PyramidLevel, optimise_level
from stx.runs.schema import CONF_DIR


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed(device: torch.device, work) -> tuple[float, float, object]:
    """Wall-clock and process CPU seconds of ``work()``, and its result."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    result = work()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu, result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=4, help="timed optimiser steps per round")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--run-steps", type=int, default=200, help="steps of the run being estimated")
    parser.add_argument("--image-every", type=int, default=50, help="tracking.image_every")
    parser.add_argument("--judge-size", type=int, default=EVAL_SIZE, help="the judge's eval long edge, px")
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as runs, initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["encoder.weights=random", f"device={args.device}", f"runs_dir={runs}"])
        job = build_job(cfg)
    device = job.device
    schedule = dataclasses.replace(job.schedule, levels=(PyramidLevel(job.schedule.size, args.steps),))
    job.loss.set_targets(job.content, job.styles, job.style_weights)
    judge = build_judge(cfg, device, size=args.judge_size)
    evaluations = args.run_steps // args.image_every + 1

    def run_block() -> torch.Tensor:
        return optimise_level(job.loss, job.content, schedule=schedule, level=0, steps=args.steps)

    def set_references() -> None:
        judge.set_references(job.content, job.styles, job.style_weights)

    image = run_block()  # warm-up
    set_references()
    judge(image)
    clocks = ("wall", "cpu") if device.type == "cpu" else ("wall",)
    seconds = {clock: {"step": [], "references": [], "evaluation": []} for clock in clocks}
    for _ in range(args.rounds):  # short alternating blocks: both sides see the same machine load
        for part, work, count in (("step", run_block, args.steps), ("references", set_references, 1),
                                  ("evaluation", lambda: judge(image), 1)):
            wall, cpu, result = timed(device, work)
            for clock, value in zip(clocks, (wall, cpu)):
                seconds[clock][part].append(value / count)
            image = result if part == "step" else image

    print(f"device={device} run size={job.schedule.size}px judge size={judge.size}px "
          f"threads={torch.get_num_threads()} rounds={args.rounds} torch={torch.__version__}")
    for clock, parts in seconds.items():
        shares = [(r + evaluations * e) / (s * args.run_steps)
                  for s, r, e in zip(parts["step"], parts["references"], parts["evaluation"])]
        step, references, evaluation = (statistics.median(v) for v in parts.values())
        print(f"[{clock} s] run {step:.3f}/step × {args.run_steps} ≈ {step * args.run_steps:.0f}; judge: "
              f"set_references {references:.3f} (= {references / step:.2f} steps) + {evaluations} × "
              f"{evaluation:.3f} (= {evaluation / step:.2f} steps each) = {references + evaluations * evaluation:.2f}")
        print(f"[{clock} s] judge per run: {100 * statistics.median(shares):.2f}% of the run (median of rounds, "
              f"range {100 * min(shares):.2f}-{100 * max(shares):.2f}%; target < 2%)")

if __name__ == "__main__":
    main()
