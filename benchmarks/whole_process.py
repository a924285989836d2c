"""Whole-process wall time, command to command: stx's CLI vs a floor process, the PyTorch
tutorial's approach and pystiche 1.0.1, each a fresh process doing the whole job.

* import torch   — ``python -c "import torch"``: what any PyTorch program pays before its first line.
* floor          — ``benchmarks/floor.py``: imports torch/torchvision, reads the two sample
                   images, builds VGG19 cut at relu5_1 (random weights), runs ``--steps``
                   forward + backward passes w.r.t. the input; no optimiser, no output.
* stx            — ``stx encoder.weights=random judge.weights=random schedule.size=S schedule.steps=N`` (otherwise the
                   shipped defaults, MLflow tracking included), in a fresh folder with a fresh
                   runs folder (``STX_RUNS_DIR``) and MLflow store each round.
* stx (store)    — the same into one runs folder kept across rounds (the common case: the
                   store already exists).
* tutorial       — ``benchmarks/tutorial.py``: the tutorial's approach, writes its result.
* pystiche       — ``benchmarks/pystiche_peer.py`` in the peer venv (``--peer-python``; make
                   it with ``benchmarks/peer_venv.sh``), writes its result.
* floor@peer     — ``benchmarks/floor.py`` in the peer venv: the floor process on torch 1.12.

Every contender runs the same number of objective evaluations (``--steps``) on the sample
images at each ``--size``. One untimed warm-up round, then ``--rounds`` rounds with the order
rotated by one place per round; reported: median seconds (and range), ÷ the floor process and
÷ the floor process on the contender's own torch, and stx's phase split from the ``perf/``
metrics it logs itself (process start → first step, the steps, the rest: scoring the output,
writing it, closing the run, exiting).

    python benchmarks/whole_process.py [--sizes 128 256] [--steps 100] [--rounds 3] [--peer-python PEER/bin/python]
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lbfgs_eval import rotations
from pystiche_peer import SCRIPT as PEER_SCRIPT
from pystiche_peer import peer_python

HERE = Path(__file__).resolve().parent
Command = Callable[[Path], tuple[list[str], dict[str, str]]]
"""Given a fresh working folder, the command line and environment of one contender's process."""


def contenders(size: int, steps: int, peer: Path | None, store: Path) -> dict[str, Command]:
    job = ["--size", str(size), "--steps", str(steps)]
    installed = Path(sys.executable).with_name("stx")  # the command; python -m stx where it is not installed as one
    stx = [*([str(installed)] if installed.is_file() else [sys.executable, "-m", "stx"]), "encoder.weights=random",
           "judge.weights=random", f"schedule.size={size}", f"schedule.steps={steps}"]

    def python(interpreter: str | Path, script: Path, *extra: str) -> Command:
        return lambda folder: ([str(interpreter), str(script), *job, *extra], dict(os.environ))

    commands: dict[str, Command] = {
        "import torch": lambda folder: ([sys.executable, "-c", "import torch"], dict(os.environ)),
        "floor": python(sys.executable, HERE / "floor.py"),
        "stx": lambda folder: (stx, {**os.environ, "STX_RUNS_DIR": str(folder / "runs")}),
        "stx (store)": lambda folder: (stx, {**os.environ, "STX_RUNS_DIR": str(store)}),
        "tutorial": python(sys.executable, HERE / "tutorial.py", "--output", "tutorial.png"),
    }
    if peer:
        commands["pystiche"] = python(peer, PEER_SCRIPT, "--output", "pystiche.png")
        commands["floor@peer"] = python(peer, HERE / "floor.py")
    return commands


def run_process(command: Command, folder: Path) -> float:
    """Run one contender in ``folder``; its wall time in seconds (its output goes to a log there)."""
    folder.mkdir(parents=True)
    argv, env = command(folder)
    with open(folder / "process.log", "w") as log:
        start = time.perf_counter()
        code = subprocess.run(argv, cwd=folder, env=env, stdout=log, stderr=subprocess.STDOUT).returncode
        seconds = time.perf_counter() - start
    if code != 0:
        raise SystemExit(f"{' '.join(argv)} failed ({code}):\n{(folder / 'process.log').read_text()}")
    return seconds


def stx_phases(runs: Path, steps: int, wall: float) -> dict[str, float] | None:
    """stx's phase split of its latest run in ``runs`` (from its ``metrics.csv``): seconds from
    process start to the first step, in the steps, and the rest of ``wall``; None when stx did
    not log ``perf/startup_seconds`` and ``perf/seconds_per_step``."""
    logged = sorted(runs.glob("*/*/metrics.csv"), key=lambda path: path.stat().st_mtime)
    if not logged:
        return None
    with open(logged[-1]) as file:
        perf = {row["key"]: float(row["value"]) for row in csv.DictReader(file) if row["key"].startswith("perf/")}
    if not {"perf/startup_seconds", "perf/seconds_per_step"} <= perf.keys():
        return None
    before, per_step = perf["perf/startup_seconds"], perf["perf/seconds_per_step"]  # start-up ends as step 1 starts
    return {"to first step": before, "steps": per_step * steps, "rest": wall - before - per_step * steps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[128, 256], help="long edges, px")
    parser.add_argument("--steps", type=int, default=100, help="objective evaluations per process")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--peer-python", type=Path, help="the peer venv's python (benchmarks/peer_venv.sh)")
    args = parser.parse_args()
    peer = peer_python(args.peer_python)
    with tempfile.TemporaryDirectory(prefix="stx-whole-process-") as base:
        for size in args.sizes:
            root = Path(base) / str(size)
            store = root / "store"
            commands = contenders(size, args.steps, peer, store)
            for name, command in commands.items():  # warm-up (file cache, bytecode) and the kept store's first run
                run_process(command, root / "warm-up" / name.replace(" ", "_"))
            seconds: dict[str, list[float]] = {name: [] for name in commands}
            phases: list[dict[str, float]] = []
            for index, order in enumerate(rotations(list(commands), args.rounds)):
                for name in order:
                    folder = root / f"round{index}" / name.replace(" ", "_")
                    seconds[name].append(run_process(commands[name], folder))
                    if name == "stx":
                        split = stx_phases(folder / "runs", args.steps, seconds[name][-1])
                        phases += [split] if split else []
            report(size, args, seconds, phases)


def report(size: int, args: argparse.Namespace, seconds: dict[str, list[float]], phases: list[dict[str, float]]) -> None:
    median = {name: statistics.median(values) for name, values in seconds.items()}
    print(f"\n{size} px (long edge), {args.steps} evaluations per process, {args.rounds} rounds (order rotated), "
          f"{os.cpu_count()} CPUs")
    print(f"{'contender':<12} {'s median':>9} {'min–max':>15} {'÷ floor':>8} {'÷ own floor':>11}")
    for name, values in seconds.items():
        own = "floor@peer" if name in ("pystiche", "floor@peer") else "floor"
        print(f"{name:<12} {median[name]:>9.2f} {f'{min(values):.2f}–{max(values):.2f}':>15} "
              f"{median[name] / median['floor']:>8.3f} {median[name] / median[own]:>11.3f}")
    print(f"stx ÷ import torch: {median['stx'] / median['import torch']:.2f} (fresh store), "
          f"{median['stx (store)'] / median['import torch']:.2f} (existing store)")
    if phases:
        split = ", ".join(f"{key} {statistics.median(p[key] for p in phases):.2f} s" for key in phases[0])
        print(f"stx (fresh store) phases, median (from its perf/ metrics): {split}")
    else:
        print("stx phases: not available (its metrics.csv holds no perf/startup_seconds, perf/seconds_per_step)")


if __name__ == "__main__":
    main()
