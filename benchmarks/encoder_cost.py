"""Seconds per objective evaluation (forward + backward) of each encoder with its Gatys loss set.

Each case is the job stx builds for ``encoder=<arch> loss=<loss> encoder.weights=random`` (sample
images, ``--size`` px), with and without ``encoder.softmax``; one evaluation is the objective's
forward pass on the image being optimised and the backward pass to its pixels. The cases are timed
in ``--rounds`` interleaved rounds of ``--evals`` evaluations (the machines are shared: alternating
short blocks see the same load); medians are reported, in wall-clock seconds and, on the CPU, in
process CPU seconds.
Usage: python benchmarks/encoder_cost.py [--size 256] [--evals 3] [--rounds 5] [--device auto]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from hydra import compose, initialize_config_dir

from stx.runs.job import build_job
from stx.runs.schema import CONF_DIR

CASES = {arch: "gatys" for arch in ("vgg19", "alexnet", "resnet50", "efficientnet_b0", "mobilenet_v2")}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--evals", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    jobs = {}
    with tempfile.TemporaryDirectory() as runs, initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        for arch, loss in CASES.items():
            for softmax in ("null", "1.0"):
                overrides = [f"encoder={arch}", f"loss={loss}", "encoder.weights=random", f"encoder.softmax={softmax}",
                             f"schedule.size={args.size}", f"device={args.device}", f"runs_dir={runs}"]
                job = build_job(compose("config", overrides=overrides))
                job.loss.set_targets(job.content, job.styles, job.style_weights)
                jobs[arch, softmax] = job
    times: dict[tuple[str, str], list[tuple[float, float]]] = {case: [] for case in jobs}
    for _ in range(args.rounds):
        for case, job in jobs.items():
            image = job.content.clone().requires_grad_(True)
            sync(job.device)
            wall, cpu = time.perf_counter(), time.process_time()
            for _ in range(args.evals):
                total, _ = job.loss(image)
                total.backward()
            sync(job.device)
            times[case].append(((time.perf_counter() - wall) / args.evals, (time.process_time() - cpu) / args.evals))
    device = next(iter(jobs.values())).device
    print(f"{args.size} px on {device} ({torch.get_num_threads()} threads), medians of {args.rounds} rounds")
    print(f"{'encoder':<16} {'softmax':<8} {'s/eval':>8} {'cpu s/eval':>11}")
    for (arch, softmax), samples in times.items():
        wall = statistics.median(s[0] for s in samples)
        cpu = statistics.median(s[1] for s in samples)
        print(f"{arch:<16} {softmax:<8} {wall:8.3f} {cpu:11.3f}")


if __name__ == "__main__":
    main()
