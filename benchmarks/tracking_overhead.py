"""Run-time cost of MLflow tracking: the same job with and without stx's logging.

Builds the default job (random VGG19 weights, sample images) and times, in rounds whose order
alternates, the bare optimisation and a whole MLflow run around it (start, per-step logging of
every loss term in batches, the image every ``--image-every`` steps, final flush, end) to a
fresh sqlite store. Prints the end-to-end ratio and, more precisely, the time spent inside the
tracking calls as a share of the tracked run.
Usage: python benchmarks/tracking_overhead.py [--size 256] [--steps 100] [--rounds 4]
"""

from __future__ import annotations

import argparse
import functools
import statistics
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from stx.runs.job import build_job
from stx.engine.optim import OptimizationCallback, optimise_image
from stx.runs.schema import CONF_DIR
from stx.runs.tracking import RunTracker


class LogSteps(OptimizationCallback):
    def __init__(self, tracker: RunTracker) -> None:
        self.tracker = tracker

    def on_step(self, info) -> None:
        self.tracker.log_step(info)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--image-every", type=int, default=50)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as runs, initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        overrides = [
            "encoder.weights=random",
            f"schedule.size={args.size}",
            f"schedule.steps={args.steps}",
            f"runs_dir={runs}",
            f"tracking.image_every={args.image_every}",
        ]
        cfg = compose("config", overrides=overrides)
        job = build_job(cfg)
        tracker = RunTracker(cfg.tracking, Path(runs))
        in_calls = [0.0]

        def timed(method):
            @functools.wraps(method)
            def wrapper(*a, **k):
                start = time.perf_counter()
                try:
                    return method(*a, **k)
                finally:
                    in_calls[0] += time.perf_counter() - start

            return wrapper

        tracker.log_step = timed(tracker.log_step)

        def optimise(callback=None):
            return optimise_image(job.loss, content=job.content, styles=job.styles, style_weights=job.style_weights,
                                  schedule=job.schedule, callback=callback)

        optimise()  # warm-up

        def untracked() -> float:
            start = time.perf_counter()
            optimise()
            return time.perf_counter() - start

        def tracked() -> float:
            start = time.perf_counter()
            with tracker.open({"benchmark": "tracking_overhead"}):
                in_calls[0] += time.perf_counter() - start  # start_run
                optimise(LogSteps(tracker))
                ending = time.perf_counter()
            in_calls[0] += time.perf_counter() - ending  # flush + end_run
            return time.perf_counter() - start

        times: dict[str, list[float]] = {"untracked": [], "tracked": []}
        shares = []
        for round_index in range(args.rounds):
            order = (("untracked", untracked), ("tracked", tracked))
            for name, run in order if round_index % 2 == 0 else order[::-1]:
                in_calls[0] = 0.0
                times[name].append(run())
                if name == "tracked":
                    shares.append(in_calls[0] / times[name][-1])
    untracked_s, tracked_s = statistics.median(times["untracked"]), statistics.median(times["tracked"])
    print(f"size={args.size}px steps={args.steps} rounds={args.rounds} image_every={args.image_every}")
    print(f"untracked {untracked_s:.3f} s/run   tracked {tracked_s:.3f} s/run   end-to-end {100 * (tracked_s / untracked_s - 1):+.2f}%"
          f"   (spread: untracked {min(times['untracked']):.2f}-{max(times['untracked']):.2f} s)")
    print(f"time inside tracking calls: {100 * statistics.median(shares):.2f}% of the tracked run (median)")


if __name__ == "__main__":
    main()
