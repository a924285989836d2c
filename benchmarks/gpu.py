"""The GPU job: 512 px × 500 L-BFGS steps of stx's default objective on one CUDA device.

Everything is measured side by side in one process, on the default job (random VGG19 weights:
timings do not depend on weight values; sample images at ``--size`` px long edge):

1. **evaluation** — seconds per objective evaluation (encoder forward + every loss + backward
   w.r.t. the image) for each variant, ÷ the floor (``benchmarks/floor.py``: VGG19 to relu5_1,
   forward + backward, fp32);
2. **optimiser** — seconds per step of each L-BFGS implementation alone, with a full history
   (history 100) on a parameter of the job's size and an objective that costs nothing;
3. **job** — ``--steps`` steps of the whole optimisation as ``stx`` runs it
   (``stx.engine.optim.optimise_image``: targets, sigmoid bounds, rise guard, best image; MLflow
   tracking excluded: ``benchmarks/whole_process.py`` measures the whole process).

Variants, for ``fp32`` (cuDNN's default TF32 convolutions) and ``bf16`` (``precision=bf16``:
CUDA autocast): as shipped (stx's L-BFGS, each step replayed from a CUDA graph), with the encoder
in ``channels_last``, without the graph (``schedule.cuda_graph=false``), with ``--compile`` the
objective under ``torch.compile`` instead of the graph (compile seconds reported apart), and
each other optimiser of ``--optimizers`` (default: ``torch.optim.LBFGS``, max_iter=1).

    python benchmarks/gpu.py [--size 512] [--steps 500] [--rounds 2] [--compile]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from floor import floor_runner
from lbfgs_eval import TORCH_LBFGS, rotations, seconds
from stx import api
from stx.runs.job import build_job
from stx.engine.optim import optimise_image

HISTORY = 100
Variant = tuple[str, bool, bool, bool, str]
"""precision, channels_last, torch.compile, schedule.cuda_graph, optimizer _target_"""
TORCH_TARGET = "torch.optim.LBFGS"


def build(size: int, steps: int, device: str, variant: Variant):
    """stx's default job at ``size`` px for ``steps`` steps on ``device``, in ``variant``."""
    precision, channels_last, compiled, graph, optimizer = variant
    overrides = ["encoder.weights=random", f"schedule.size={size}", f"schedule.steps={steps}", f"device={device}",
                 f"precision={precision}", f"schedule.cuda_graph={graph}"]
    overrides += optimizer_overrides(optimizer)
    job = build_job(api.compose_config(overrides))
    if channels_last:
        job.loss.encoder.to(memory_format=torch.channels_last)
    if compiled:
        job.loss.forward = torch.compile(job.loss.forward)
    return job


def optimizer_overrides(target: str) -> list[str]:
    """Config overrides selecting the L-BFGS ``target`` with one evaluation per step."""
    return TORCH_LBFGS if target == TORCH_TARGET else [f"schedule.optimizer._target_={target}"]


def per_eval(job, evals: int) -> float:
    """Seconds per evaluation of ``job``'s objective at its content's size, targets set."""
    with job.schedule.autocast(job.device):
        job.loss.set_targets(job.content, job.styles, job.style_weights)
    image = job.content.clone().requires_grad_(True)

    def run() -> None:
        for _ in range(evals):
            image.grad = None
            with job.schedule.autocast(job.device):
                total, _ = job.loss(image)
            total.backward()

    run()  # warm-up (and compilation)
    return min(seconds(run, job.device) for _ in range(3)) / evals


def per_optimizer_step(make: Callable[[list[torch.Tensor]], torch.optim.Optimizer], like: torch.Tensor, steps: int) -> float:
    """Seconds per step of an optimiser alone on a parameter shaped as ``like``, timed over
    ``steps`` steps once its history is full: the objective is a quadratic whose gradient gets
    fresh noise at every evaluation, so it costs a few kernels and never converges."""
    target = torch.rand_like(like)
    parameter = torch.zeros_like(like, requires_grad=True)
    optimizer = make([parameter])
    scale = torch.linspace(0.5, 2.0, parameter.numel(), device=like.device).view(like.shape)

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        loss = (scale * (parameter - target) ** 2).sum() + (torch.randn_like(parameter) * parameter).sum() * 1e-2
        loss.backward()
        return loss

    def run(n: int) -> None:
        for _ in range(n):
            optimizer.step(closure)

    run(HISTORY + 20)
    return seconds(lambda: run(steps), like.device) / steps


def job_seconds(job) -> float:
    return seconds(lambda: optimise_image(job.loss, content=job.content, styles=job.styles,
                                          style_weights=job.style_weights, schedule=job.schedule), job.device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=512, help="long edge, px")
    parser.add_argument("--steps", type=int, default=500, help="L-BFGS steps of the job")
    parser.add_argument("--rounds", type=int, default=2, help="timed runs of each job (order rotated)")
    parser.add_argument("--compile", action="store_true", help="also the torch.compile variants")
    parser.add_argument("--device", default="cuda", help="cuda (cpu only to try the script out)")
    parser.add_argument("--optimizers", nargs="*", default=["stx.engine.lbfgs.LBFGS", TORCH_TARGET],
                        help="L-BFGS implementations (_target_s) to compare; the first one runs the jobs")
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    name = torch.cuda.get_device_name() if cuda else "CPU"
    print(f"device: {name}, torch {torch.__version__}, cuDNN {torch.backends.cudnn.version()}, "
          f"size {args.size} px, {args.steps} steps", flush=True)

    precisions = ("fp32", "bf16") if cuda else ("fp32",)
    ours, *others = args.optimizers
    variants: dict[str, Variant] = {}
    for p in precisions:
        variants.update({p: (p, False, False, True, ours), f"{p}+cl": (p, True, False, True, ours),
                         f"{p} no graph": (p, False, False, False, ours)})
        if args.compile:
            variants[f"{p}+compile"] = (p, False, True, False, ours)
        variants.update({f"{p} {other.rpartition('.')[0]}": (p, False, False, False, other) for other in others})
    jobs, build_s = {}, {}
    for name, variant in variants.items():
        started = time.perf_counter()
        jobs[name] = build(args.size, args.steps, args.device, variant)
        build_s[name] = time.perf_counter() - started

    content = next(iter(jobs.values())).content
    floor = floor_runner(content)
    floor(3)
    floor_s = min(seconds(lambda: floor(20), content.device) for _ in range(3)) / 20
    print(f"\n1. evaluation at {tuple(content.shape[-2:])} (floor: {floor_s * 1e3:.2f} ms)", flush=True)
    print(f"{'variant':<20} {'ms/eval':>8} {'÷ floor':>8} {'first call s':>12}")
    for name, job in jobs.items():
        started = time.perf_counter()
        try:
            value = per_eval(job, 20)
        except Exception as exc:  # a variant that does not run is reported, the others go on
            print(f"{name:<20} failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}", flush=True)
            jobs[name] = None
            continue
        print(f"{name:<20} {value * 1e3:>8.2f} {value / floor_s:>8.3f} {time.perf_counter() - started:>12.1f}", flush=True)

    print(f"\n2. optimiser alone, history {HISTORY}, {content.numel()} pixels values", flush=True)
    for target in args.optimizers:
        module, _, cls = target.rpartition(".")
        make = getattr(__import__(module, fromlist=[cls]), cls)
        extra = {"max_iter": 1} if target == TORCH_TARGET else {}
        value = per_optimizer_step(lambda params: make(params, lr=1.0, history_size=HISTORY, **extra), content, 100)
        print(f"{target:<28} {value * 1e3:>8.3f} ms/step", flush=True)

    print(f"\n3. whole job: {args.steps} steps (median of {args.rounds}, order rotated; kernels warmed up by 1.)", flush=True)
    names = [name for name, job in jobs.items() if job is not None]
    timings: dict[str, list[float]] = {name: [] for name in names}
    for order in rotations(names, args.rounds):
        for name in order:
            timings[name].append(job_seconds(jobs[name]))
    print(f"{'variant':<20} {'s/job':>7} {'min':>7} {'max':>7} {'ms/step':>8} {'build s':>8}")
    for name, values in timings.items():
        median = statistics.median(values)
        print(f"{name:<20} {median:>7.2f} {min(values):>7.2f} {max(values):>7.2f} {median / args.steps * 1e3:>8.2f} "
              f"{build_s[name]:>8.1f}", flush=True)
    if cuda:
        print(f"peak memory: {torch.cuda.max_memory_allocated() / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
