"""A sweep's wall time, sequential vs batched, on the same runs in one invocation.

Each contender is a fresh ``stx -m`` process running the same sweep of ``--runs`` values of
``loss.style.score_weight`` (× ``--lrs`` values of ``schedule.optimizer.lr`` when given) at
``--size`` px × ``--steps`` steps with HED's trained VGG16 (``encoder=vgg16 encoder.weights=hed``;
``--weights random`` where HED's cannot be had, e.g. on a machine without the package registry),
into a store of its own prepared by an untimed warm-up sweep:

* basic    — ``hydra/launcher=basic``: Hydra's launcher, the jobs one after another in the process.
* batched  — stx's default launcher (``hydra/launcher=stx_batched``, :mod:`stx.runs.launcher`): the
             jobs as threads, sharing each encoder pass (:mod:`stx.engine.batching`).

``--launchers`` runs only some of them (the ratios need both). Rounds alternate the order. Reported: median seconds of the whole process (start-up, jobs, the
sweep's summary), the median of the jobs' phase alone (the first job's start to the last job's
end, from the runs' MLflow start and end times), and batched ÷ basic for both; then whether
each run's final total loss is the same in both (relative difference). On a CUDA device it also
samples the GPUs' utilisation every 250 ms (``nvidia-smi``) over each sweep and reports its mean.

    python benchmarks/sweep.py [--size 48] [--steps 20] [--runs 8] [--lrs 1 0.5] [--rounds 3] [--device cpu]
    python benchmarks/sweep.py --device cuda --size 512 --steps 500 --runs 16 --lrs 1 0.7 0.5 0.35 --rounds 1
    python benchmarks/sweep.py --device cuda --weights random --size 512 --steps 500 --runs 16 --lrs 1 0.7 0.5 0.35 \
        --rounds 1 --launchers batched     # the issue's 64-run goal alone
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mlflow.tracking import MlflowClient

LAUNCHERS = {"basic": ["hydra/launcher=basic"], "batched": []}


def sweep_args(args: argparse.Namespace) -> list[str]:
    weights = ",".join(f"{10 ** (2 + 4 * index / max(1, args.runs - 1)):.3g}" for index in range(args.runs))
    extra = [f"schedule.optimizer.lr={','.join(map(str, args.lrs))}"] if args.lrs else []
    judge = ["judge.weights=random"] if args.weights == "random" else []  # else the default judge (HED's here)
    return ["-m", "encoder=vgg16", f"encoder.weights={args.weights}", *judge, f"schedule.size={args.size}",
            f"schedule.steps={args.steps}",
            f"device={args.device}", f"loss.style.score_weight={weights}", *extra]


def run_sweep(name: str, args: argparse.Namespace, runs_dir: Path, utilisation: list[float] | None = None) -> float:
    """One sweep in a fresh process; its wall seconds. With ``utilisation``, the GPUs' mean
    utilisation over the sweep (%) is appended to it."""
    installed = Path(sys.executable).with_name("stx")  # the command; python -m stx where it is not installed as one
    command = [*([str(installed)] if installed.is_file() else [sys.executable, "-m", "stx"]), *sweep_args(args),
               *LAUNCHERS[name]]
    env = {**os.environ, "STX_RUNS_DIR": str(runs_dir)}
    sampler = None
    if utilisation is not None:
        sampler = subprocess.Popen(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                                    "-lms", "250"], stdout=subprocess.PIPE, text=True)
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seconds = time.perf_counter() - started
    if sampler is not None:
        sampler.terminate()
        samples = [float(line) for line in sampler.communicate()[0].split() if line.strip().isdigit()]
        utilisation.append(statistics.mean(samples) if samples else float("nan"))
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stdout[-3000:]}")
    return seconds


def latest_sweep(runs_dir: Path) -> tuple[float, dict[str, float]]:
    """The latest sweep's jobs phase (s) and each run's final total loss, by its swept values."""
    client = MlflowClient(f"sqlite:///{runs_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("stx")
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=5000)
    parent = next(run for run in runs if run.data.tags.get("stx.sweep") == "true")
    children = [run for run in runs if run.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    phase = (max(run.info.end_time for run in children) - min(run.info.start_time for run in children)) / 1000
    swept = ("loss.style.score_weight", "schedule.optimizer.lr")
    losses = {tuple(run.data.params.get(key) for key in swept): run.data.metrics.get("total", float("nan"))
              for run in children}
    return phase, losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=48, help="long edge, px")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=8, help="values of loss.style.score_weight")
    parser.add_argument("--lrs", type=float, nargs="*", default=[], help="values of schedule.optimizer.lr (× runs)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--weights", default="hed", choices=["hed", "random"], help="encoder.weights (random: the judge's too)")
    parser.add_argument("--launchers", nargs="+", default=list(LAUNCHERS), choices=list(LAUNCHERS))
    args = parser.parse_args()
    launchers = args.launchers
    with tempfile.TemporaryDirectory(prefix="stx-sweep-bench-") as base:
        stores = {name: Path(base) / name for name in launchers}
        for name in launchers:  # warm-up: the store, the weights cache, bytecode
            run_sweep(name, args, stores[name])
        wall: dict[str, list[float]] = {name: [] for name in launchers}
        phase: dict[str, list[float]] = {name: [] for name in launchers}
        finals: dict[str, dict[str, float]] = {}
        busy: dict[str, list[float] | None] = {name: [] if args.device.startswith("cuda") else None for name in launchers}
        for index in range(args.rounds):
            for name in (launchers if index % 2 == 0 else launchers[::-1]):
                wall[name].append(run_sweep(name, args, stores[name], busy[name]))
                seconds, finals[name] = latest_sweep(stores[name])
                phase[name].append(seconds)
    jobs = args.runs * max(1, len(args.lrs))
    weights = "HED VGG16" if args.weights == "hed" else "random VGG16"
    print(f"\n{jobs} runs at {args.size} px × {args.steps} steps, {weights}, device {args.device}, {os.cpu_count()} CPUs, "
          f"{args.rounds} rounds (order alternated)")
    print(f"{'launcher':<9} {'whole s':>8} {'min–max':>13} {'jobs s':>7} {'min–max':>13}")
    for name in launchers:
        print(f"{name:<9} {statistics.median(wall[name]):>8.2f} {f'{min(wall[name]):.2f}–{max(wall[name]):.2f}':>13} "
              f"{statistics.median(phase[name]):>7.2f} {f'{min(phase[name]):.2f}–{max(phase[name]):.2f}':>13}")
    for name, samples in busy.items():
        if samples:
            print(f"{name}: GPU utilisation over the sweep, mean of 250 ms samples: {statistics.median(samples):.0f} %")
    if len(launchers) < 2:
        return
    whole = statistics.median(wall["batched"]) / statistics.median(wall["basic"])
    jobs_ratio = statistics.median(phase["batched"]) / statistics.median(phase["basic"])
    print(f"batched ÷ basic: whole process {whole:.2f}, jobs phase {jobs_ratio:.2f}")
    differences = [abs(finals["batched"][key] - value) / max(abs(value), 1e-12) for key, value in finals["basic"].items()]
    print(f"final total loss, batched vs basic, largest relative difference over the runs: {max(differences):.2e}")


if __name__ == "__main__":
    main()
