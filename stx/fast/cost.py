"""What a feed-forward model costs a deployer: multiply-adds per frame and CPU latency.

Multiply-adds count the convolutions (everything else in these networks is a small fraction);
latency is the median wall time of single-frame calls after a warm-up, with the thread count it
ran with reported beside it.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch
from torch import nn


def multiply_adds(model: nn.Module, size: int) -> int:
    """Multiply-adds of ``model``'s convolutions on one ``size×size`` frame (the model is left in eval mode)."""
    total = 0

    def count(module: nn.Conv2d, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        nonlocal total
        total += output.numel() * (module.in_channels // module.groups) * module.kernel_size[0] * module.kernel_size[1]

    hooks = [m.register_forward_hook(count) for m in model.modules() if isinstance(m, nn.Conv2d)]
    try:
        with torch.no_grad():
            model.eval()(torch.rand(1, 3, size, size, device=next(model.parameters()).device))
    finally:
        for hook in hooks:
            hook.remove()
    return total


def median_latency(run: Callable[[torch.Tensor], object], size: int, frames: int = 20) -> float:
    """Median seconds of ``run`` on one ``1×3×size×size`` CPU frame, over ``frames`` calls after two warm-ups."""
    frame = torch.rand(1, 3, size, size)
    times = []
    with torch.no_grad():
        for index in range(frames + 2):
            started = time.perf_counter()
            run(frame)
            if index >= 2:
                times.append(time.perf_counter() - started)
    return statistics.median(times)
