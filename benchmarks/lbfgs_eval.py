"""Seconds per L-BFGS objective evaluation: stx vs the floor, the PyTorch tutorial's approach
and pystiche 1.0.1, each over whole runs with one optimiser.

Every contender optimises the same objective (content relu4_2, Gram relu1_1…relu5_1 × 1e3,
random VGG19 weights: timings do not depend on weight values) from the sample content image at
``--size`` px with L-BFGS (lr=1, history 100, one evaluation per step), keeping ONE
optimiser for a whole run of ``--evals`` evaluations, so the cost of a full history is paid.

* floor    — one forward + backward of torchvision's VGG19 cut at relu5_1 w.r.t. the input
             (``benchmarks/floor.py``), no optimiser.
* stx      — stx's default job (``encoder.weights=random``, everything else as shipped:
             ``schedule=lbfgs``, stx's L-BFGS, sigmoid bounds, rise guard) through
             ``stx.engine.optim.optimise_level``; ``stx+torch`` the same with ``torch.optim.LBFGS``.
* tutorial — the PyTorch tutorial's approach (``benchmarks/tutorial.py``).
* pystiche — pystiche 1.0.1's ``image_optimization`` in its own process in the peer venv
             (``benchmarks/pystiche_peer.py``; make the venv with ``benchmarks/peer_venv.sh``),
             which also times ``floor@peer``, the floor on the peer's torch 1.12. Without
             ``--peer-python`` both are skipped.

Each round runs every contender once, the order rotated by one place per round; reported: the
median seconds per evaluation over the rounds, its range, ÷ the floor on this torch and
÷ the floor on the contender's own torch.

    python benchmarks/lbfgs_eval.py [--size 256] [--evals 100] [--rounds 5] [--peer-python PEER/bin/python]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from floor import floor_runner, load_samples
from pystiche_peer import PeerServer, peer_python
from stx import api
from stx.runs.job import build_job
from stx.engine.optim import optimise_level
from tutorial import tutorial_runner

WARM_UP_EVALS = 3


def seconds(run: Callable[[], object], device: torch.device) -> float:
    """Seconds ``run()`` took, the device's queued work included."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    run()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def timed(run: Callable[[int], object], device: torch.device) -> Callable[[int], float]:
    """``run`` as a function returning the seconds ``run(evals)`` took."""
    return lambda evals: seconds(lambda: run(evals), device)


TORCH_LBFGS = ["schedule.optimizer._target_=torch.optim.LBFGS", "+schedule.optimizer.max_iter=1"]
"""Overrides that run stx's job with torch.optim.LBFGS, one evaluation per step."""


def stx_runner(size: int, device: torch.device, overrides: tuple[str, ...] = ()) -> Callable[[int], torch.Tensor]:
    """``run(evals)``: stx's default job (with ``overrides``), targets set once, one optimiser per run."""
    job = build_job(api.compose_config(["encoder.weights=random", f"schedule.size={size}", f"device={device}", *overrides]))
    job.loss.set_targets(job.content, job.styles, job.style_weights)
    return lambda evals: optimise_level(job.loss, job.content, schedule=job.schedule, level=0, steps=evals)


def rotations(names: list[str], rounds: int) -> list[list[str]]:
    """The order of each round: ``names`` rotated by one place per round."""
    return [names[r % len(names):] + names[: r % len(names)] for r in range(rounds)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=256, help="long edge, px")
    parser.add_argument("--evals", type=int, default=100, help="evaluations per run (one optimiser)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--peer-python", type=Path, help="the peer venv's python (benchmarks/peer_venv.sh)")
    args = parser.parse_args()
    device = torch.device(args.device)
    python = peer_python(args.peer_python)
    content, style = load_samples(args.size, device)
    contenders = {
        "floor": timed(floor_runner(content), device),
        "stx": timed(stx_runner(args.size, device), device),
        "stx+torch": timed(stx_runner(args.size, device, TORCH_LBFGS), device),
        "tutorial": timed(tutorial_runner(content, style), device),
    }
    torch_of = dict.fromkeys(contenders, torch.__version__)
    own_floor = dict.fromkeys(contenders, "floor")
    peer = PeerServer(python, args.size, args.device) if python else None
    if peer:
        contenders["pystiche"], contenders["floor@peer"] = peer.runner("pystiche"), peer.runner("floor")
        for name in ("pystiche", "floor@peer"):
            torch_of[name], own_floor[name] = peer.info["torch"], "floor@peer"
    try:
        for run in contenders.values():
            run(WARM_UP_EVALS)
        per_eval: dict[str, list[float]] = {name: [] for name in contenders}
        for order in rotations(list(contenders), args.rounds):
            for name in order:
                per_eval[name].append(contenders[name](args.evals) / args.evals)
    finally:
        if peer:
            peer.close()

    print(f"\ndevice={device} size={args.size}px (long edge) threads={torch.get_num_threads()} "
          f"evals/run={args.evals} rounds={args.rounds} (order rotated each round)"
          + (f" peer: pystiche {peer.info['pystiche']}, threads={peer.info['threads']}" if peer else ""))
    median = {name: statistics.median(values) for name, values in per_eval.items()}
    print(f"{'contender':<11} {'torch':<14} {'s/eval median':>13} {'min':>8} {'max':>8} {'÷ floor':>8} {'÷ own floor':>11}")
    for name, values in per_eval.items():
        print(f"{name:<11} {torch_of[name]:<14} {median[name]:>13.4f} {min(values):>8.4f} {max(values):>8.4f} "
              f"{median[name] / median['floor']:>8.3f} {median[name] / median[own_floor[name]]:>11.3f}")


if __name__ == "__main__":
    main()
