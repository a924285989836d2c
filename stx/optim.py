"""Image optimisation: Gatys-style pixel optimisation over an image pyramid.

The image is a leaf tensor (``1×3×H×W``, [0, 1]) optimised with any ``torch.optim``
optimiser; pixel values are clamped into [0, 1] before every evaluation. A pyramid runs
coarse-to-fine levels, each with its own size and number of steps; the result of one level,
upsampled, starts the next, and loss targets are recomputed once per level.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.optim import Optimizer

from stx.errors import ConfigError, NonFiniteLossError
from stx.image import MIN_SIZE, check_size, resize
from stx.losses import PerceptualObjective

INITS = ("content", "random", "style")
PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass(frozen=True)
class PyramidLevel:
    """One level of the schedule: optimise at ``size`` px (long edge) for ``steps`` steps."""

    size: int
    steps: int

    def __post_init__(self) -> None:
        check_size(self.size, "pyramid level size")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"pyramid level steps={self.steps!r} is not valid: use a whole number >= 0.")


@dataclass
class StepInfo:
    """What the per-step callback receives.

    ``step`` counts optimiser steps from 1 across all levels; ``terms`` holds every loss term
    (see :class:`~stx.losses.PerceptualObjective`) and ``"total"`` as Python floats, measured
    at the evaluation that step started from; ``image`` is the current image (do not modify).
    """

    step: int
    level: int
    size: int
    terms: dict[str, float]
    image: torch.Tensor


@dataclass
class Checkpoint:
    """Everything needed to continue an optimisation exactly, taken after ``step`` steps.

    ``level`` indexes the pyramid level the step belongs to; ``image`` is that level's current
    image and ``optimizer_state`` the optimiser's ``state_dict()`` (L-BFGS history included).
    """

    step: int
    level: int
    image: torch.Tensor
    optimizer_state: dict


StepCallback = Callable[[StepInfo], None]
CheckpointCallback = Callable[[Checkpoint], None]
OptimizerFactory = Callable[[list[torch.Tensor]], Optimizer]


def style_edge(size: int, style_scale: float) -> int:
    """Long edge (px) of the style images at a level of ``size`` px."""
    return max(MIN_SIZE, round(size * style_scale))


def initial_image(init: str, content: torch.Tensor, style: torch.Tensor, seed: int) -> torch.Tensor:
    """Starting image at the content's size: the content, uniform noise, or the (resized) style."""
    if init == "content":
        return content.clone()
    if init == "random":
        generator = torch.Generator().manual_seed(seed)
        return torch.rand(content.shape, generator=generator).to(content.device)
    if init == "style":
        return torch.nn.functional.interpolate(style, size=content.shape[-2:], mode="bicubic", antialias=True).clamp_(0, 1)
    raise ConfigError(f"schedule.init={init!r} is not valid; use one of {', '.join(INITS)}.")


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Autocast context for ``precision`` (``fp32``, ``bf16`` or ``fp16``); reduced precision needs CUDA."""
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is not valid; use one of {', '.join(PRECISIONS)}.")
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    if device.type != "cuda":
        raise ConfigError(
            f"precision={precision} uses CUDA autocast, but the device is {device}; use precision=fp32 "
            f"on the CPU."
        )
    return torch.autocast("cuda", dtype=dtype)


def optimise_image(
    objective: PerceptualObjective,
    content: torch.Tensor,
    styles: Sequence[torch.Tensor],
    style_weights: Sequence[float],
    levels: Sequence[PyramidLevel],
    optimizer: OptimizerFactory,
    init: str = "content",
    seed: int = 0,
    style_scale: float = 1.0,
    precision: str = "fp32",
    callback: StepCallback | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: CheckpointCallback | None = None,
    start: Checkpoint | None = None,
) -> torch.Tensor:
    """Optimise an image to minimise ``objective``; return it (``1×3×H×W``, [0, 1]).

    ``content`` and ``styles`` are full-resolution ``1×3×H×W`` images on the target device;
    at each level the content is resized to the level's size and each style to
    ``style_scale ×`` that size. ``optimizer`` builds a fresh optimiser per level from the
    parameter list (e.g. ``functools.partial(torch.optim.LBFGS, lr=1, max_iter=1)``).
    Raises :class:`NonFiniteLossError` if the objective turns NaN/inf; its ``image`` attribute
    is then the last image with a finite loss. Every ``checkpoint_every`` steps (0: never),
    ``on_checkpoint`` receives a :class:`Checkpoint`; passing one as ``start`` continues from it
    and gives the same result as an uninterrupted run.
    """
    if not levels:
        raise ConfigError("the schedule has no levels: give at least one size and number of steps.")
    amp = autocast(content.device, precision)
    torch.manual_seed(seed)
    step = 0
    image: torch.Tensor | None = None
    for level_index, level in enumerate(levels):
        if start is not None and level_index < start.level:
            step += level.steps
            continue
        level_content = resize(content, level.size)
        level_styles = [resize(style, style_edge(level.size, style_scale)) for style in styles]
        with amp:
            objective.set_targets(level_content, level_styles, style_weights)
        state, done = None, 0
        if start is not None and level_index == start.level:
            image, state, done = start.image.to(content.device), start.optimizer_state, start.step - step
        elif image is None:
            image = initial_image(init, level_content, level_styles[0], seed)
        else:
            image = torch.nn.functional.interpolate(
                image, size=level_content.shape[-2:], mode="bicubic", align_corners=False
            ).clamp_(0, 1)
        image = optimise_level(
            objective, image, optimizer, level.steps - done, amp, callback, step + done, level_index,
            state, checkpoint_every, on_checkpoint,
        )
        step += level.steps
    assert image is not None
    return image


def optimise_level(
    objective: PerceptualObjective,
    image: torch.Tensor,
    optimizer: OptimizerFactory,
    steps: int,
    amp: contextlib.AbstractContextManager | None = None,
    callback: StepCallback | None = None,
    first_step: int = 0,
    level: int = 0,
    optimizer_state: dict | None = None,
    checkpoint_every: int = 0,
    on_checkpoint: CheckpointCallback | None = None,
) -> torch.Tensor:
    """Run ``steps`` optimiser steps on a copy of ``image`` against the objective's current targets.

    Returns the optimised image (detached, clamped to [0, 1]). Steps are numbered from
    ``first_step + 1`` in the callback. ``optimizer_state`` restores the optimiser. See
    :func:`optimise_image` for errors and checkpoints.
    """
    amp = amp or contextlib.nullcontext()
    image = image.detach().clone().requires_grad_(True)
    last_finite = image.detach().clone()
    optimiser = optimizer([image])
    if optimizer_state is not None:
        optimiser.load_state_dict(optimizer_state)
    measured: dict[str, torch.Tensor] = {}
    step = first_step

    def closure() -> torch.Tensor:
        optimiser.zero_grad(set_to_none=True)
        with torch.no_grad():
            image.clamp_(0.0, 1.0)
        with amp:
            total, terms = objective(image)
        if not torch.isfinite(total):
            bad = [name for name, value in terms.items() if not torch.isfinite(value)]
            raise NonFiniteLossError(
                f"the loss became {total.item()} at step {step + 1} (non-finite terms: "
                f"{', '.join(bad) or 'total'}); the run stopped and kept the last image with a "
                f"finite loss. Lower the learning rate or the score weights.",
                step + 1,
                last_finite,
            )
        total.backward()
        last_finite.copy_(image.detach())
        measured.clear()
        measured.update(terms, total=total)
        return total

    for _ in range(steps):
        optimiser.step(closure)
        step += 1
        with torch.no_grad():  # the next evaluation clamps too; this keeps what others see in range
            image.clamp_(0.0, 1.0)
        if callback is not None:
            values = torch.stack([v.detach().float() for v in measured.values()]).tolist()
            size = max(image.shape[-2:])
            callback(StepInfo(step, level, size, dict(zip(measured, values)), image.detach()))
        if on_checkpoint is not None and checkpoint_every > 0 and step % checkpoint_every == 0:
            on_checkpoint(Checkpoint(step, level, image.detach().clone(), optimiser.state_dict()))
    with torch.no_grad():
        image.clamp_(0.0, 1.0)  # also for steps == 0
    return image.detach()
