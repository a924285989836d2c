"""Peak memory and seconds per evaluation of the objective, untiled and tiled, against image size.

Each measurement runs in a fresh process (so peak memory is its own): the default loss set
(content relu4_2, Gram relu1_1…relu5_1; random VGG19 weights), random content, style and
image at ``size×size`` px, targets set, then ``--evaluations`` value+gradient evaluations; the
process reports the median seconds per evaluation and its peak memory (CUDA's allocator peak on
a GPU, else peak RSS). Untiled sizes whose estimate does not fit the free memory are reported
as such, not run. The optimiser's own state (L-BFGS keeps ``2 × history_size`` image copies) is
not included: it is the same with and without tiles.
Usage: python benchmarks/tiling_memory.py [--sizes 512 1024 2048] [--tile 512] [--evaluations 2] [--device auto]
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from stx.engine import encoders, losses, plan
from stx.runs.job import resolve_device
from stx.engine.tiling import check_tileable
from stx.engine.tiling import TiledObjective

STYLE_LAYERS = {layer: 0.2 for layer in ("relu1_1", "relu2_1", "relu3_1", "relu4_1", "relu5_1")}


def build(device: torch.device) -> losses.PerceptualObjective:
    encoder = encoders.vgg19([*STYLE_LAYERS, "relu4_2"], weights="random", pooling="max", seed=0)
    loss_set = {"content": losses.ContentLoss({"relu4_2": 1.0}), "style": losses.GramStyleLoss(STYLE_LAYERS, 1e3)}
    return losses.PerceptualObjective(encoder, loss_set).to(device)


def measure(size: int, tile: int, evaluations: int, device: torch.device) -> dict:
    """One configuration, in this process: seconds per evaluation and peak memory (bytes)."""
    objective = build(device)
    model = TiledObjective(objective, tile) if tile else objective
    generator = torch.Generator().manual_seed(0)
    content, style, image = (torch.rand(1, 3, size, size, generator=generator).to(device) for _ in range(3))
    model.set_targets(content, [style], [1.0])
    seconds = []
    for _ in range(evaluations):
        pixels = image.clone().requires_grad_(True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        total, _ = model(pixels)
        total.backward()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - started)
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    return {"seconds": statistics.median(seconds), "peak_bytes": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[512, 1024, 2048])
    parser.add_argument("--tile", type=int, default=512)
    parser.add_argument("--evaluations", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--child", nargs=2, type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.child:
        print(json.dumps(measure(*args.child, args.evaluations, device)))
        return
    free = plan.available_bytes(device)
    objective = build(torch.device("cpu"))
    print(f"device {device}, free memory {free / 2**30:.1f} GiB, torch {torch.__version__}, tile {args.tile} px")
    print(f"{'size':>6} {'mode':>8} {'estimate GiB':>13} {'peak GiB':>9} {'s/eval':>8}")
    for size in args.sizes:
        for tile in (0, args.tile):
            if tile and tile >= size:
                continue
            estimate = (sum(plan.tiled_estimate(objective, size, size, tile, check_tileable(objective), 0, 1).values()) if tile else
                        sum(plan.estimate_bytes(objective, size, size, 0, 1).values()))
            mode = f"tile {tile}" if tile else "untiled"
            if estimate > plan.HEADROOM * free:
                print(f"{size:>6} {mode:>8} {estimate / 2**30:>13.2f} {'does not fit':>18}", flush=True)
                continue
            command = [sys.executable, __file__, "--child", str(size), str(tile), "--evaluations",
                       str(args.evaluations), "--device", args.device]
            result = json.loads(subprocess.run(command, capture_output=True, text=True, check=True).stdout)
            print(f"{size:>6} {mode:>8} {estimate / 2**30:>13.2f} {result['peak_bytes'] / 2**30:>9.2f} "
                  f"{result['seconds']:>8.2f}", flush=True)


if __name__ == "__main__":
    main()
