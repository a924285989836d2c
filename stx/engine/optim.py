"""Image optimisation: Gatys-style pixel optimisation over an image pyramid.

The image (``1×3×H×W``, [0, 1]) is optimised with any ``torch.optim`` optimiser, either
directly with pixel values clamped into [0, 1] before every evaluation (``bounds=clamp``), or
through its logit, ``image = sigmoid(parameter)`` (``bounds=sigmoid``), which keeps it in the box
without moving it behind the optimiser's back (a clamp corrupts L-BFGS's curvature pairs). A
step that raises the loss above ``max_rise`` × the lowest loss so far is undone and the
optimiser's history restarted; each level returns its lowest-loss image. A :class:`Schedule`
holds the pyramid's levels (coarse to fine, each with its own size and number of steps) and
how to optimise them; :func:`optimise_image` hands each level to :func:`optimise_level`. The
result of one level, upsampled, starts the next, and loss targets are recomputed once per level.
Progress, logging and checkpoint writing stay outside the loop, in an :class:`OptimizationCallback`.
The loop itself never waits for the device: the lowest loss and its image are kept with device-side
masks, and each step's loss terms stay on the device until the callback is handed a chunk of steps
(at most :data:`STEP_CHUNK`, or at once for a step whose image it needs), read back in one copy; a
non-finite loss is found there. Only the rise guard (``max_rise``, off for L-BFGS) reads the loss
every step.
On a CUDA device, steps of :class:`~stx.engine.lbfgs.LBFGS` after the first two are replayed from a CUDA
graph (:class:`CapturedStep`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch.optim import Optimizer

from stx.engine import batching
from stx.engine.image import MAX_SIZE, MIN_SIZE, check_size, resize
from stx.engine.lbfgs import LBFGS
from stx.engine.losses import PerceptualObjective
from stx.errors import ConfigError, NonFiniteLossError

log = logging.getLogger(__name__)

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}
STEP_CHUNK = 32
"""Most steps whose loss terms wait on the device before they are read back and reported."""
OptimizerFactory = Callable[[list[torch.Tensor]], Optimizer]


@dataclass(frozen=True)
class PyramidLevel:
    """One level of the schedule: optimise at ``size`` px (long edge) for ``steps`` steps."""

    size: int
    steps: int

    def __post_init__(self) -> None:
        check_size(self.size, "pyramid level size")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 0:
            raise ConfigError(f"pyramid level steps={self.steps!r} is not valid: use a whole number >= 0.")


def _content_init(content: torch.Tensor, style: torch.Tensor, seed: int) -> torch.Tensor:
    return content.clone(memory_format=torch.contiguous_format)


RANDOM_INIT_STD = 0.1
"""Standard deviation of the white noise ``init=random`` starts from, around mid-grey. Noise filling
[0, 1] (as uniform noise does) would put many pixels where ``bounds=sigmoid`` saturates: they barely
move, and the noise stays in the picture after hundreds of steps (seen with Gatys et al.'s setting)."""


def _random_init(content: torch.Tensor, style: torch.Tensor, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(content.shape, generator=generator).mul_(RANDOM_INIT_STD).add_(0.5).clamp_(0, 1)
    return noise.to(content.device)


def _style_init(content: torch.Tensor, style: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.nn.functional.interpolate(style, size=content.shape[-2:], mode="bicubic", antialias=True).clamp_(0, 1)


INITS = {"content": _content_init, "random": _random_init, "style": _style_init}
"""Starting images at the content's size: the content, white noise around mid-grey (seeded), or the resized style."""

BOUNDS = ("sigmoid", "clamp")
SIGMOID_MARGIN = 1e-3
"""Under ``bounds=sigmoid`` pixel values start within [margin, 1 − margin] (the logit of 0 or 1 is infinite)."""


def to_parameter(image: torch.Tensor, bounds: str) -> torch.Tensor:
    """The tensor optimised for ``image`` (a contiguous copy): the image itself, or its logit."""
    if bounds == "sigmoid":
        return torch.logit(image.clamp(SIGMOID_MARGIN, 1.0 - SIGMOID_MARGIN))
    return image.clone(memory_format=torch.contiguous_format)


def to_image(parameter: torch.Tensor, bounds: str) -> torch.Tensor:
    """The image a parameter stands for (see :func:`to_parameter`)."""
    return torch.sigmoid(parameter) if bounds == "sigmoid" else parameter


def restart(optimizer: Optimizer) -> None:
    """Forget the optimiser's history, in place (``step()`` holds a reference to its state)."""
    if isinstance(optimizer, LBFGS):
        optimizer.reset()
        return
    for state in optimizer.state.values():
        state.clear()
    if isinstance(optimizer, torch.optim.LBFGS):
        optimizer.state[optimizer.param_groups[0]["params"][0]].update(func_evals=0, n_iter=0)


@dataclass(frozen=True, kw_only=True)
class Schedule:
    """How an image is optimised: the pyramid ``levels``, the optimiser (a factory taking the
    parameter list, e.g. ``functools.partial(stx.engine.lbfgs.LBFGS, lr=1)``), the
    starting image (``init``: a key of :data:`INITS`), how pixels stay in [0, 1] (``bounds``: one
    of :data:`BOUNDS`), the largest factor by which a step may raise the loss over the lowest so
    far before it is undone (``max_rise``; 0: off), the style images' long edge as a multiple of
    each level's (``style_scale``), checkpoints every ``checkpoint_every`` steps (0: never), the
    autocast ``precision`` (a key of :data:`PRECISIONS`), the random ``seed``, and whether a step
    of :class:`~stx.engine.lbfgs.LBFGS` on a CUDA device is replayed from a CUDA graph (``cuda_graph``,
    see :class:`CapturedStep`)."""

    levels: tuple[PyramidLevel, ...]
    make_optimizer: OptimizerFactory
    init: str
    bounds: str
    max_rise: float
    style_scale: float
    checkpoint_every: int
    precision: str
    seed: int
    cuda_graph: bool = True

    def __post_init__(self) -> None:
        object.__setattr__(self, "levels", tuple(self.levels))
        if not self.levels:
            raise ConfigError("schedule.levels is empty: give at least one {size: …, steps: …}.")
        if self.init not in INITS:
            raise ConfigError(f"schedule.init={self.init!r} is not valid; use one of {', '.join(INITS)}.")
        if self.bounds not in BOUNDS:
            raise ConfigError(f"schedule.bounds={self.bounds!r} is not valid; use one of {', '.join(BOUNDS)}.")
        if not (self.max_rise == 0 or 1 < self.max_rise < float("inf")):
            raise ConfigError(f"schedule.max_rise={self.max_rise!r} is not valid: use 0 (off) or a factor > 1, e.g. 2.")
        if not (isinstance(self.style_scale, (int, float)) and 0 < self.style_scale < float("inf")):
            raise ConfigError(f"schedule.style_scale={self.style_scale!r} is not valid: use a number > 0.")
        largest = max(level.size for level in self.levels)
        if isinstance(largest, int) and self.style_edge(largest) > MAX_SIZE:
            raise ConfigError(
                f"schedule.style_scale={self.style_scale!r} makes the style images {self.style_edge(largest)} px at the "
                f"{largest} px level, more than stx handles ({MAX_SIZE} px); use a scale of at most "
                f"{MAX_SIZE / largest:.3g} for this size, e.g. 1.")
        if self.checkpoint_every < 0:
            raise ConfigError(
                f"schedule.checkpoint_every={self.checkpoint_every} is not valid: use 0 (off) or a number of steps."
            )
        if self.precision not in PRECISIONS:
            raise ConfigError(f"precision={self.precision!r} is not valid; use one of {', '.join(PRECISIONS)}.")
        try:
            probe = self.make_optimizer([torch.zeros(1, requires_grad=True)])
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"schedule.optimizer is not valid: {exc}") from exc
        # L-BFGS keeps 2 × history_size image-sized vectors, the direction and the previous
        # gradient, and works with a copy of the gradient (torch's) or five vectors (stx's: s, y
        # and the three it multiplies the history by); other optimisers keep at most two (e.g.
        # Adam's moments); the level keeps the best parameter and, under sigmoid bounds, the
        # image computed from the parameter.
        history = probe.defaults.get("history_size")
        if isinstance(probe, LBFGS):
            optimizer_images = 2 * history + 7
        else:
            optimizer_images = 2 * history + 3 if history else 2
        object.__setattr__(self, "state_images", optimizer_images + 2)

    state_images: int = field(init=False, default=0)
    """Image-sized tensors the optimiser keeps (for the memory estimate); set from the optimiser."""

    @property
    def steps(self) -> int:
        return sum(level.steps for level in self.levels)

    @property
    def size(self) -> int:
        """Long edge of the largest level, px."""
        return max(level.size for level in self.levels)

    def style_edge(self, size: int) -> int:
        """Long edge (px) of the style images at a level of ``size`` px."""
        return max(MIN_SIZE, round(size * self.style_scale))

    def autocast(self, device: torch.device, cache: bool = True) -> contextlib.AbstractContextManager:
        """Autocast context for the precision on ``device``; reduced precision needs CUDA.
        ``cache=False`` while a CUDA graph is captured (cast weights must not outlive it)."""
        dtype = PRECISIONS[self.precision]
        if dtype is None:
            return contextlib.nullcontext()
        if device.type != "cuda":
            raise ConfigError(
                f"precision={self.precision} uses CUDA autocast, but the device is {device}; use "
                f"precision=fp32 on the CPU."
            )
        return torch.autocast("cuda", dtype=dtype, cache_enabled=cache)


@dataclass
class StepInfo:
    """What :meth:`OptimizationCallback.on_step` receives.

    ``step`` counts optimiser steps from 1 across all levels (a schedule without steps reports
    its starting image once, as step 0); ``values`` holds every loss term
    (see :class:`~stx.engine.losses.PerceptualObjective`) and ``"total"`` as Python floats, measured
    at the evaluation that step started from; ``image`` is the image after the step (do not
    modify) or, for a step the callback did not ask to see (:meth:`OptimizationCallback.needs_image`)
    reported in a chunk, the image after the chunk's last step.
    """

    step: int
    level: int
    size: int
    values: dict[str, float]
    image: torch.Tensor


@dataclass
class Checkpoint:
    """Everything needed to continue an optimisation exactly, taken after ``step`` steps.

    ``level`` indexes the pyramid level the step belongs to; ``parameter`` is that level's
    optimised tensor (see :func:`to_parameter`), ``optimizer_state`` the optimiser's
    ``state_dict()`` (L-BFGS history included), ``best`` the parameter with the lowest loss so
    far in the level and ``best_loss`` that loss.
    """

    step: int
    level: int
    parameter: torch.Tensor
    optimizer_state: dict
    best: torch.Tensor
    best_loss: float


class OptimizationCallback:
    """Hooks called from the optimisation loop; subclass and override what you need."""

    def on_start(self) -> None:
        """Once, just before the first step (the first level's targets are set)."""

    def needs_image(self, step: int) -> bool:
        """Whether :meth:`on_step` must see step ``step``'s image, so that the step is reported
        at once. Steps it need not see are reported in chunks of up to :data:`STEP_CHUNK`, with
        one read-back of their values from the device and the chunk's last image. Default: every
        step (one read-back a step)."""
        return True

    def on_step(self, info: StepInfo) -> None:
        """After every optimiser step, in order (a chunk's steps one after the other)."""

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        """Every ``schedule.checkpoint_every`` steps."""


def optimise_image(
    objective: PerceptualObjective,
    *,
    content: torch.Tensor,
    styles: Sequence[torch.Tensor],
    style_weights: Sequence[float],
    schedule: Schedule,
    callback: OptimizationCallback | None = None,
    start: Checkpoint | None = None,
    initial: torch.Tensor | None = None,
) -> torch.Tensor:
    """Optimise an image to minimise ``objective``; return it (``1×3×H×W``, [0, 1]).

    The first level starts from ``schedule.init``, or from ``initial`` (a ``1×3×H×W`` image in
    [0, 1] on the content's device, resized to the level) when given.
    ``content`` and ``styles`` are full-resolution ``1×3×H×W`` images on the target device;
    at each level the content is resized to the level's size and each style to
    :meth:`Schedule.style_edge` of it; ``style_weights`` blend the styles. Raises
    :class:`NonFiniteLossError` if the objective turns NaN/inf; its ``image`` attribute is then
    the lowest-loss image of the level. Passing a :class:`Checkpoint` as ``start`` continues from
    it and gives the same result as an uninterrupted run.
    """
    callback = callback or OptimizationCallback()
    amp = schedule.autocast(content.device)
    torch.manual_seed(schedule.seed)
    step = 0
    image: torch.Tensor | None = None
    for index, level in enumerate(schedule.levels):
        if start is not None and index < start.level:
            step += level.steps
            continue
        level_content = resize(content, level.size)
        level_styles = [resize(style, schedule.style_edge(level.size)) for style in styles]
        with amp:
            objective.set_targets(level_content, level_styles, style_weights)
        resume, done = None, 0
        if start is not None and index == start.level:
            device = content.device
            resume = dataclasses.replace(start, parameter=start.parameter.to(device), best=start.best.to(device))
            done = start.step - step
        elif image is None and initial is not None:
            image = torch.nn.functional.interpolate(
                initial, size=level_content.shape[-2:], mode="bicubic", antialias=True
            ).clamp_(0, 1)
        elif image is None:
            image = INITS[schedule.init](level_content, level_styles[0], schedule.seed)
        else:
            image = torch.nn.functional.interpolate(
                image, size=level_content.shape[-2:], mode="bicubic", align_corners=False
            ).clamp_(0, 1)
        if step + done == (start.step if start is not None else 0):
            callback.on_start()
        image = optimise_level(
            objective, image, schedule=schedule, level=index, steps=level.steps - done, first_step=step + done,
            resume=resume, amp=amp, callback=callback,
        )
        step += level.steps
    assert image is not None
    if start is None and schedule.steps == 0:  # nothing to optimise: report the starting image's loss
        with torch.no_grad(), amp:
            total, values = objective(image)
        measured = {**values, "total": total}
        floats = torch.stack([v.float() for v in measured.values()]).tolist()
        callback.on_step(StepInfo(0, len(schedule.levels) - 1, max(image.shape[-2:]), dict(zip(measured, floats)), image))
    return image


class CapturedStep:
    """One step of :class:`~stx.engine.lbfgs.LBFGS` after its first (evaluation, backward, update),
    recorded once as a CUDA graph and replayed, so a step costs the GPU's time instead of the
    ~1000 kernel launches it is made of.

    ``replay()`` returns the loss terms and ``"total"`` (tensors, see
    :class:`~stx.engine.losses.PerceptualObjective`) measured at the parameter the step started from,
    which it leaves in ``evaluated``. Everything the graph reads or writes — the parameter, its
    gradient, the optimiser's state, the objective's targets — stays where it was when it was
    recorded: build a new one after anything replaces them (a new pyramid level, a loaded state).
    """

    def __init__(self, evaluate: Callable[[], tuple[torch.Tensor, dict[str, torch.Tensor]]],
                 parameter: torch.Tensor, optimizer: LBFGS) -> None:
        self.evaluated = torch.empty_like(parameter)
        self.grad = parameter.grad = torch.zeros_like(parameter)
        self.measured: dict[str, torch.Tensor] = {}

        def closure() -> torch.Tensor:
            self.grad.zero_()
            total, values = evaluate()
            total.backward()
            self.measured = {name: value.detach() for name, value in {**values, "total": total}.items()}
            return total

        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.evaluated.copy_(parameter)
            optimizer.step(closure)

    def replay(self) -> dict[str, torch.Tensor]:
        self.graph.replay()
        return self.measured


def optimise_level(
    objective: PerceptualObjective,
    image: torch.Tensor | None,
    *,
    schedule: Schedule,
    level: int,
    steps: int,
    first_step: int = 0,
    resume: Checkpoint | None = None,
    amp: contextlib.AbstractContextManager | None = None,
    callback: OptimizationCallback | None = None,
) -> torch.Tensor:
    """Run ``steps`` optimiser steps from ``image`` (or from ``resume``, a checkpoint of this
    level on the objective's device) against the objective's current targets.

    Returns the image with the lowest loss seen (detached, in [0, 1]). Steps are numbered from
    ``first_step + 1``; ``level`` is reported with them. See :func:`optimise_image` for errors
    and checkpoints, :class:`Schedule` for ``bounds``, ``max_rise`` and ``cuda_graph``.
    """
    amp = amp or contextlib.nullcontext()
    callback = callback or OptimizationCallback()
    bounds = schedule.bounds
    source = resume.parameter if resume is not None else to_parameter(image, bounds)
    parameter = source.detach().clone(memory_format=torch.contiguous_format).requires_grad_(True)
    optimizer = schedule.make_optimizer([parameter])
    if resume is not None:
        optimizer.load_state_dict(resume.optimizer_state)
    best = (resume.best if resume is not None else parameter).detach().clone()
    best_loss = torch.tensor(resume.best_loss if resume is not None else math.inf, dtype=torch.float64,
                             device=parameter.device)
    measured: dict[str, torch.Tensor] = {}
    pending: list[tuple[int, torch.Tensor]] = []  # steps not reported yet: (step, its values stacked, on the device)
    step = first_step
    batch = batching.active()
    batched = batch is not None and type(objective) is PerceptualObjective and bool(objective.layers)
    graphable = (schedule.cuda_graph and parameter.is_cuda and isinstance(optimizer, LBFGS)
                 and type(objective) is PerceptualObjective and not batched)
    captured: CapturedStep | None = None
    warmed_up = False

    def current_image() -> torch.Tensor:
        """The image the parameter stands for, with its graph (under ``bounds=clamp`` the parameter
        is clamped first)."""
        if bounds == "clamp":
            with torch.no_grad():
                parameter.clamp_(0.0, 1.0)
        return to_image(parameter, bounds)

    def evaluate(context: contextlib.AbstractContextManager = amp) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        image = current_image()
        with context:
            return objective(image)

    def alone(image: torch.Tensor) -> batching.Evaluation:
        """The objective at ``image``, back-propagated into the parameter's gradient (no batch)."""
        with amp:
            total, values = objective(image)
        total.backward()
        return total.detach(), {name: value.detach() for name, value in values.items()}

    def non_finite(total: float, values: dict[str, float], at: int) -> NonFiniteLossError:
        bad = [name for name, value in values.items() if name != "total" and not math.isfinite(value)]
        return NonFiniteLossError(
            f"the loss became {total} at step {at} (non-finite terms: {', '.join(bad) or 'total'}); the run "
            f"stopped and kept the image with the lowest finite loss. Lower the learning rate or the score weights.",
            at,
            to_image(best, bounds).clamp(0.0, 1.0),
        )

    def keep_if_best(total: torch.Tensor, evaluated: torch.Tensor) -> None:
        """``evaluated`` becomes the best when ``total`` is below the best loss (never NaN), on the device."""
        total = total.detach().double()
        better = total < best_loss
        best.copy_(torch.where(better, evaluated, best))
        best_loss.copy_(torch.where(better, total, best_loss))

    def back_to_best() -> None:
        """Undo a step that raised the loss above ``max_rise`` × the best: the best parameter,
        a new history."""
        with torch.no_grad():
            parameter.copy_(best)
        restart(optimizer)

    def guard_rise(total: torch.Tensor, values: dict[str, torch.Tensor]) -> bool:
        """The rise guard, a host decision (one read-back): whether ``total`` rose above ``max_rise``
        × the best, after refusing a non-finite one."""
        value, lowest = torch.stack([total.detach().double(), best_loss]).tolist()
        if not math.isfinite(value):
            raise non_finite(value, {name: float(v) for name, v in values.items()}, step + 1)
        return value > schedule.max_rise * lowest

    def closure() -> torch.Tensor:
        optimizer.zero_grad(set_to_none=True)
        total, values = evaluate_with_gradient(current_image())
        if schedule.max_rise and guard_rise(total, values):
            back_to_best()
            optimizer.zero_grad(set_to_none=True)
            total, values = evaluate_with_gradient(current_image())
        keep_if_best(total, parameter.detach())
        measured.clear()  # detached: a graph kept alive would pin the parameter's AccumulateGrad to this stream
        measured.update(values, total=total)
        return total

    def replayed_step() -> None:
        """A step from the CUDA graph; the rise guard and the best image are kept after it."""
        values = captured.replay()
        if schedule.max_rise and guard_rise(values["total"], values):
            back_to_best()
            optimizer.step(closure)  # from the best image, with a new history, as without a graph
            return
        keep_if_best(values["total"], captured.evaluated)
        measured.clear()
        measured.update(values)

    def report() -> None:
        """Hand the pending steps to the callback, their values read back in one copy, with the
        current image. A non-finite total stops the run at its step."""
        chunk = list(pending)
        pending.clear()
        rows = torch.stack([values for _, values in chunk]).tolist()
        current = to_image(parameter.detach(), bounds)
        for (number, _), row in zip(chunk, rows):
            values = dict(zip(measured, row))
            if not math.isfinite(values["total"]):
                raise non_finite(values["total"], values, number)
            callback.on_step(StepInfo(number, level, max(current.shape[-2:]), values, current))

    sharing = (batch.member(objective, parameter.shape, parameter.device,
                            functools.partial(schedule.autocast, parameter.device), schedule.precision, optimizer)
               if batched else contextlib.nullcontext(alone))
    if batch is not None and not batched:
        batch.arrive()  # evaluates alone: the batch's runs need not wait for it
    try:
        with sharing as evaluate_with_gradient:
            for index in range(steps):
                if graphable and optimizer.started and warmed_up and captured is None:
                    uncached = functools.partial(evaluate, schedule.autocast(parameter.device, cache=False))
                    try:
                        captured = CapturedStep(uncached, parameter, optimizer)
                    except RuntimeError as exc:  # something in the objective cannot be recorded: go on without
                        log.warning("stx: warning: the step could not be recorded as a CUDA graph (%s); going on without "
                                    "one (schedule.cuda_graph=false skips the attempt)", str(exc).splitlines()[0])
                        graphable = False
                if captured is not None and optimizer.started:
                    replayed_step()
                elif graphable and optimizer.started and not warmed_up:  # CUDA's warm-up: a step on a side stream
                    side = torch.cuda.Stream()
                    side.wait_stream(torch.cuda.current_stream())
                    with torch.cuda.stream(side):
                        optimizer.step(closure)
                    torch.cuda.current_stream().wait_stream(side)
                    warmed_up = True
                else:
                    optimizer.step(closure)
                step += 1
                if bounds == "clamp":
                    with torch.no_grad():  # the next evaluation clamps too; this keeps what others see in range
                        parameter.clamp_(0.0, 1.0)
                pending.append((step, torch.stack([v.detach().float() for v in measured.values()])))
                checkpoint = schedule.checkpoint_every > 0 and step % schedule.checkpoint_every == 0
                if checkpoint or len(pending) >= STEP_CHUNK or index == steps - 1 or callback.needs_image(step):
                    report()
                if checkpoint:
                    callback.on_checkpoint(Checkpoint(step, level, parameter.detach().clone(), optimizer.state_dict(),
                                                      best.clone(), best_loss.item()))
    except KeyboardInterrupt:
        if pending:  # the steps taken are reported, the latest with its image, before the run stops
            report()
        raise
    return to_image(best, bounds).clamp(0.0, 1.0)
