"""Run-time cost of MLflow tracking: the same job with and without stx's per-step logging.

Builds the default job (random VGG19 weights, sample images) and times, in interleaved rounds,
the bare optimisation and a whole MLflow run (start, flush, end) around it whose
``RunTracker.log_step`` logs every loss term each step (async) and the image every
``--image-every`` steps to a fresh sqlite store.
Usage: python benchmarks/tracking_overhead.py [--size 128] [--steps 50] [--rounds 3]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

from hydra import compose, initialize_config_dir

from stx.config import CONF_DIR, build_job
from stx.tracking import RunTracker


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=3)
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
        tracker = RunTracker(cfg.tracking)
        job.run()  # warm-up
        times: dict[str, list[float]] = {"untracked": [], "tracked": []}
        for _ in range(args.rounds):
            start = time.perf_counter()
            job.run()
            times["untracked"].append(time.perf_counter() - start)
            start = time.perf_counter()
            with tracker.run({"benchmark": "tracking_overhead"}):  # start, log, flush, end
                job.run(tracker.log_step)
            times["tracked"].append(time.perf_counter() - start)
    untracked, tracked = statistics.median(times["untracked"]), statistics.median(times["tracked"])
    print(f"size={args.size}px steps={args.steps} rounds={args.rounds} image_every={args.image_every}")
    print(f"untracked {untracked:.3f} s/run   tracked {tracked:.3f} s/run   overhead {100 * (tracked / untracked - 1):+.2f}%")


if __name__ == "__main__":
    main()
