"""Images per second of a feed-forward model at 512 px: eager PyTorch vs TorchScript vs ONNX Runtime.

    .venv/bin/python benchmarks/stylize_speed.py [--size 512] [--batch 1] [--seconds 10] [--device cpu|cuda]

Builds Johnson et al.'s network at its default width (``conf/model/johnson.yaml``: 32 channels,
5 residual blocks; the weights do not change the speed), exports it the way ``stx train`` does
(:mod:`stx.fast.export`), and times each runtime on ``batch`` random ``size×size`` images after two
warm-up calls, for at least ``seconds`` each. On CUDA the eager and TorchScript models also run
under fp16 autocast; ONNX Runtime uses its CUDA provider when installed (else it is skipped on
CUDA). Prints one Markdown table row per runtime.
"""

from __future__ import annotations

import argparse
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from stx.fast import export
from stx.fast.transformer import TransformerNet


def images_per_second(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, seconds: float,
                      synchronize: Callable[[], None]) -> float:
    with torch.no_grad():
        for _ in range(2):
            model(image)
        synchronize()
        calls, started = 0, time.perf_counter()
        while time.perf_counter() - started < seconds:
            model(image)
            calls += 1
        synchronize()
        return calls * image.shape[0] / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--seconds", type=float, default=10.0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    model = TransformerNet()
    with tempfile.TemporaryDirectory() as folder:
        scripted_path = export.export_torchscript(model, Path(folder) / export.TORCHSCRIPT_FILE)
        onnx_path = export.export_onnx(model, Path(folder) / export.ONNX_FILE)
        runtimes: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
            "eager": model.to(device).eval(),
            "TorchScript": export.load_torchscript(scripted_path, device),
        }
        onnx = export.OnnxModel(onnx_path, device)
        if device.type == "cpu" or "CUDAExecutionProvider" in onnx.session.get_providers():
            runtimes["ONNX Runtime"] = onnx
        if device.type == "cuda":
            for name in ("eager", "TorchScript"):
                runtimes[f"{name} fp16 autocast"] = lambda x, m=runtimes[name]: _autocast(m, x)
        image = torch.rand(args.batch, 3, args.size, args.size, device=device)
        synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        where = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
        print(f"| runtime | images/s at {args.size}×{args.size}, batch {args.batch} ({where}) |")
        print("|---|---|")
        for name, runtime in runtimes.items():
            print(f"| {name} | {images_per_second(runtime, image, args.seconds, synchronize):.2f} |", flush=True)


def _autocast(model: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor) -> torch.Tensor:
    with torch.autocast("cuda", dtype=torch.float16):
        return model(image)


if __name__ == "__main__":
    main()
