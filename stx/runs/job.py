"""Assemble one job from a composed config, top to bottom: input paths → objective (losses and
their encoder) → schedule → the input files' headers checked (:func:`~stx.engine.inputs.check_files`)
→ one memory plan (fit, tiling) → the judge → images, masks, init image and the judge's
references, decoded once → colour control.

Everything is built with ``_target_`` + ``hydra.utils.instantiate`` after its ``_target_``
is checked against an allow-list *by name*, before anything is imported. Each value is
checked by the code that owns it (image I/O, losses, encoders, :class:`~stx.engine.optim.Schedule`);
the first problem raises :class:`~stx.errors.ConfigError` with a one-paragraph message, before
any optimisation or tracking starts.
"""

from __future__ import annotations

import inspect
import logging
import math
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate, to_absolute_path
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stx.engine import color, encoders, losses, tiling
from stx.engine.image import image_shape
from stx.engine.inputs import InputFiles, check_files
from stx.engine.judge import EVAL_SIZE, Judge, judge_encoder, judge_name, resolve_judge
from stx.engine.optim import PyramidLevel, Schedule
from stx.engine.plan import plan_memory
from stx.errors import ConfigError, StxError
from stx.runs import layout, plugins
from stx.runs.objectives import Objective

log = logging.getLogger(__name__)

ALLOWED_TARGETS = {
    "loss": (("stx.engine.losses",), losses.Loss, True),
    "encoder": (("stx.engine.encoders",), None, True),
    "schedule.optimizer": (("stx.engine.lbfgs", "torch.optim"), torch.optim.Optimizer, False),
    "model": (("stx.fast.transformer", "stx.fast.mobile"), torch.nn.Module, False),
    "trainer.lr_schedule": (("torch.optim.lr_scheduler",), torch.optim.lr_scheduler.LRScheduler, False),
    "color": (("stx.engine.color",), color.ColorControl, True),
}
"""Per kind of config node: the modules its ``_target_`` may come from, the class it must
derive from, and whether trusted plugin modules (:mod:`stx.runs.plugins`) may provide it too."""


@dataclass
class Job:
    """Everything one run needs, built and checked from a config.

    ``content`` and ``styles`` are full-resolution ``1×3×H×W`` images in [0, 1] on ``device``
    (the styles already at the largest level's style size); ``content_path`` and
    ``style_paths`` are the absolute paths they were read from.
    """

    loss: losses.PerceptualObjective | tiling.TiledObjective
    content: torch.Tensor
    styles: list[torch.Tensor]
    style_weights: list[float]
    schedule: Schedule
    device: torch.device
    content_path: Path
    style_paths: list[Path]
    judge: Judge
    """Scores images against the inputs (references set), for the ``eval/…`` metrics."""
    objective: Objective
    """What the job returns to the sweeper, from the final ``eval/…`` metrics."""
    color: color.ColorControl
    """Has prepared ``content`` and ``styles`` (what the objective sees); its ``finish`` turns
    the optimised image into the result (applied to every logged image)."""
    initial: torch.Tensor | None = None
    """The image to start from instead of ``schedule.init`` (``schedule.init_image``), if any."""
    memory: int = 0
    """Planned peak bytes of the optimisation's largest level (:func:`~stx.engine.plan.plan_memory`)."""
    init_path: Path | None = None
    """The absolute path ``initial`` was read from."""


def objective_of(cfg: DictConfig) -> Objective:
    """The sweep objective of ``cfg.objective``."""
    node = cfg.objective
    return Objective(metrics=dict(node.metrics), pareto=node.pareto, limits=dict(node.limits), penalty=node.penalty)


def resolve_device(name: str) -> torch.device:
    """``auto`` → CUDA when available, else CPU; ``cuda`` must exist when asked for."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"device={name!r} is not valid; use auto, cpu, cuda or cuda:N.") from exc
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index or 0) >= count:
            raise ConfigError(
                f"device={name!r} was asked for, but this machine has {count} CUDA device(s); "
                f"use device=cpu, or device=auto to take CUDA only when present."
            )
    elif device.type != "cpu":
        raise ConfigError(f"device={name!r} is not supported; use auto, cpu, cuda or cuda:N.")
    return device


def check_target(node: Any, where: str, kind: str) -> Any:
    """The object ``node._target_`` names, once its dotted name has passed the allow-list of
    ``kind`` (a key of :data:`ALLOWED_TARGETS`); nothing is imported before that."""
    homes, base, pluggable = ALLOWED_TARGETS[kind]
    name = node.get("_target_") if isinstance(node, DictConfig) else None
    if not name:
        raise ConfigError(f"{where} needs a _target_ naming what to build (e.g. stx.engine.losses.GramStyleLoss).")
    allowed = f"a {base.__module__}.{base.__qualname__}" if base is not None else "an encoder"
    modules = (*homes, *plugins.trusted_modules()) if pluggable else homes
    module = next((m for m in modules if isinstance(name, str) and name.startswith(m + ".")), None)
    if module is None:
        hint = f"; {plugins.how_to_trust(name.rpartition('.')[0] or name)}" if pluggable and isinstance(name, str) else ""
        raise ConfigError(
            f"{where}._target_={name!r} is not allowed: it must name {allowed} from {' or '.join(modules)}{hint}."
        )
    try:
        target = get_object(name)
    except Exception as exc:
        raise ConfigError(f"{where}._target_={name!r} cannot be imported ({exc}).") from exc
    from_module = str(getattr(target, "__module__", "")).startswith(module)
    if not from_module or (base is not None and not (inspect.isclass(target) and issubclass(target, base))):
        raise ConfigError(f"{where}._target_={name!r} is not {allowed} from {module}.")
    for key, value in node.items():
        if _names_a_target(value):
            raise ConfigError(f"{where}.{key} holds a nested _target_; only {where} itself may name what to build.")
    return target


def _names_a_target(value: Any) -> bool:
    """Whether a config value holds a ``_target_`` at any depth (instantiate would call it)."""
    if isinstance(value, DictConfig):
        return "_target_" in value or any(_names_a_target(v) for v in value.values())
    if isinstance(value, ListConfig):
        return any(_names_a_target(v) for v in value)
    return False


def build(node: DictConfig, where: str, kind: str, **kwargs: Any) -> Any:
    """``instantiate(node)`` after :func:`check_target`; errors become one-paragraph ConfigErrors."""
    check_target(node, where, kind)
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{where}: {cause}") from cause
        raise ConfigError(f"{where} could not be built: {cause or exc}") from exc


def style_weights(images: DictConfig) -> list[float]:
    """One blend weight per style image (default: equal); finite, >= 0, not all zero."""
    count = len(images.styles)
    if count == 0:
        raise ConfigError("images.styles is empty: give at least one style image path.")
    given = images.style_weights
    try:
        weights = [1.0] * count if given is None else [float(w) for w in list(given)]
        if not isinstance(given, (ListConfig, type(None))):
            raise TypeError
    except (TypeError, ValueError) as exc:
        raise ConfigError(
            f"images.style_weights={OmegaConf.to_container(given) if isinstance(given, DictConfig) else given!r} is not "
            f"valid: give a list of numbers, one per style image, or null for equal weights."
        ) from exc
    if len(weights) != count:
        raise ConfigError(
            f"images.style_weights has {len(weights)} value(s) for {count} style image(s); give one "
            f"weight per style, or leave it null for equal weights."
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"images.style_weights={weights} is not valid: use finite weights >= 0, not all zero.")
    return weights


def build_schedule(cfg: DictConfig) -> Schedule:
    """The :class:`Schedule` of ``cfg.schedule`` with the top-level ``precision`` and ``seed``."""
    schedule = cfg.schedule
    return Schedule(
        levels=tuple(PyramidLevel(level.size, level.steps) for level in schedule.levels),
        make_optimizer=build(schedule.optimizer, "schedule.optimizer", "schedule.optimizer"),
        init=schedule.init,
        bounds=schedule.bounds,
        max_rise=schedule.max_rise,
        style_scale=schedule.style_scale,
        checkpoint_every=schedule.checkpoint_every,
        cuda_graph=schedule.cuda_graph,
        precision=cfg.precision,
        seed=cfg.seed,
    )


def build_judge(cfg: DictConfig, device: torch.device | str = "cpu", *, size: int = EVAL_SIZE) -> Judge:
    """The judge of a run: ``cfg.judge`` (see :func:`~stx.engine.judge.resolve_judge`), nothing
    else of the run. A config logged before the judge had its own keys is judged as then: VGG19
    with the run's ``encoder.weights``."""
    if "judge" not in cfg:
        arch, weights = "vgg19", cfg.encoder.weights
    else:
        arch, weights, warning = resolve_judge(cfg.judge.arch, cfg.judge.weights)
        if warning:
            log.warning("stx: warning: %s", warning)
    return Judge(judge_encoder(weights, device, arch), size=size, name=judge_name(arch, weights))


def file_stamp(path: Path) -> tuple[str, int, int] | None:
    """``path``, its size and modification time (None when it is not a file): what a cache of
    something read from the file is keyed by, so that a changed file is read again."""
    if not path.is_file():
        return None
    info = path.stat()
    return str(path), info.st_size, info.st_mtime_ns


_last_judge: tuple[tuple, Judge] | None = None
"""The judge of this process's last job, with the key of its references (see :func:`judge_of`)."""


def judge_of(cfg: DictConfig, device: torch.device, files: InputFiles, weights: list[float]) -> tuple[Judge, bool]:
    """The judge of a job and whether its references are set: the previous job's judge when it was
    built from the same settings and judged the same files (path, size, modification time) with the
    same blend weights, as a sweep's jobs in one process do (its reference pass costs more than a
    small job's steps), else a new one (:func:`build_judge`) whose references are still to be set."""
    global _last_judge
    judge_weights = Path(str(cfg.judge.weights if "judge" in cfg else cfg.encoder.weights))
    key = (OmegaConf.to_yaml(cfg.judge) if "judge" in cfg else cfg.encoder.weights, str(device),
           file_stamp(judge_weights), file_stamp(files.content), tuple(map(file_stamp, files.styles)), tuple(weights))
    if _last_judge is not None and _last_judge[0] == key:
        return _last_judge[1], True
    judge = build_judge(cfg, device)
    _last_judge = key, judge
    return judge, False


_building = threading.Lock()
"""One job is built at a time: the jobs of a batched sweep (threads) share the judge and encoders."""


def build_job(cfg: DictConfig) -> Job:
    """Check ``cfg`` and build the :class:`Job` it describes (raises :class:`ConfigError`)."""
    with _building:
        return _build_job(cfg)


@dataclass
class Checked:
    """What :func:`check_job` read from a config: the values a job is built from that need neither
    weights nor pixels."""

    device: torch.device
    objective: Objective
    paths: tuple[Path, list[Path], Path | None]
    """The content, the styles and the init image (or None), absolute."""
    style_weights: list[float]
    terms: dict[str, losses.Loss]
    schedule: Schedule
    control: color.ColorControl


def check_job(cfg: DictConfig) -> Checked:
    """Every check of a job that needs neither weights nor pixels, in milliseconds: the config resolves,
    every value and type (device, objective, style weights, each loss term, the schedule, the colour
    control, the output name) and the input files' headers; raises :class:`ConfigError` or
    :class:`~stx.errors.ImageError`. A sweep runs it for every job before the first starts."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"the config cannot be resolved: {exc}") from exc
    device = resolve_device(cfg.device)
    objective = objective_of(cfg)
    paths = input_paths(cfg)
    weights = style_weights(cfg.images)
    terms = {str(name): build(node, f"loss.{name}", "loss") for name, node in cfg.loss.items()}
    schedule = build_schedule(cfg)
    control = build(cfg.color, "color", "color")
    for key, path in (("images.content", paths[0]), *((f"images.styles.{i}", p) for i, p in enumerate(paths[1])),
                      ("schedule.init_image", paths[2])):
        if path is not None:
            try:
                image_shape(path)
            except StxError as exc:
                raise type(exc)(f"{key}: {exc}") from exc
    layout.check_output(cfg.output)
    return Checked(device, objective, paths, weights, terms, schedule, control)


def _build_job(cfg: DictConfig) -> Job:
    # The config is read here, top to bottom, into values; the engine and layout get values only,
    # each called once, in the order they import one another (the judge, the output name, the plan).
    checked = check_job(cfg)
    device, schedule, control, weights = checked.device, checked.schedule, checked.control, checked.style_weights
    content_path, style_paths, init_path = checked.paths
    loss = build_objective(cfg, device, checked.terms)
    schedule.autocast(device)
    files = check_files(loss, schedule, content_path, style_paths, init_path)
    judge, judged = judge_of(cfg, device, files, weights)
    plan = plan_memory(cfg.schedule.tile, loss, schedule, files, device)
    if max(plan.content_shape) < schedule.size:
        log.warning("stx: warning: images.content is %d×%d px; it is upscaled to a %d px long edge (schedule.size), "
                    "which adds no detail", plan.content_shape[1], plan.content_shape[0], schedule.size)
    inputs = files.read(loss, schedule, device, None if judged else judge.size)
    content, styles = control.prepare(inputs.content, inputs.styles)
    initial = None if inputs.initial is None else control.start(inputs.initial)
    if not judged:
        judge.set_references(inputs.references[0], inputs.references[1:], weights, background=device.type == "cpu")
    loss = plan.apply(loss)
    return Job(loss, content, styles, weights, schedule, device, content_path, style_paths, judge, checked.objective,
               control, initial, sum(plan.estimate.values()), init_path)


def input_paths(cfg: DictConfig) -> tuple[Path, list[Path], Path | None]:
    """The absolute paths of ``images.content``, ``images.styles`` and ``schedule.init_image`` (None
    when not set); relative ones are taken from the folder stx started in, and a URL is refused."""
    init = cfg.schedule.init_image
    given = {"images.content": cfg.images.content, "schedule.init_image": init,
             **{f"images.styles.{index}": path for index, path in enumerate(cfg.images.styles)}}
    for key, path in given.items():
        if path is not None and not isinstance(path, str):  # e.g. a nested list or a mapping in a logged config
            shown = OmegaConf.to_container(path) if isinstance(path, (DictConfig, ListConfig)) else path
            raise ConfigError(f"{key}={shown!r} is not valid: give the path of an image file (a string).")
        if "://" in str(path):
            raise ConfigError(f"{key}={path!r} is a URL; stx reads image files on this machine: download it first "
                              f"and give its path.")
    return (Path(to_absolute_path(cfg.images.content)), [Path(to_absolute_path(path)) for path in cfg.images.styles],
            None if init is None else Path(to_absolute_path(init)))


def build_objective(cfg: DictConfig, device: torch.device | str = "cpu",
                    terms: dict[str, losses.Loss] | None = None) -> losses.PerceptualObjective:
    """The loss set of ``cfg.loss`` (or its ``terms``, already built) over an encoder of ``cfg.encoder``
    built with just the layers it reads, on ``device``. The encoder is shared with the previous jobs of
    this process that asked for the same one (:func:`shared_encoder`)."""
    loss_set = terms if terms is not None else {str(n): build(node, f"loss.{n}", "loss") for n, node in cfg.loss.items()}
    layers = frozenset().union(*(loss.layers for loss in loss_set.values()))
    encoder = shared_encoder(cfg.encoder, layers, torch.device(device)) if layers else None
    return losses.PerceptualObjective(encoder, loss_set).to(device)


ENCODER_LAYER_SETS = "layers"
"""The key of an ``encoder`` config naming the layers the loss options read on that network
(``loss.*.layers: ${encoder.layers.style}``); not an argument of the encoder's builder."""


def build_encoder(node: DictConfig, layers: frozenset[str]) -> encoders.MultiLayerEncoder:
    """The encoder of config ``node`` (less its :data:`ENCODER_LAYER_SETS`) reading ``layers``."""
    settings = OmegaConf.to_container(node, resolve=True)
    settings.pop(ENCODER_LAYER_SETS, None)
    encoder = build(OmegaConf.create(settings), "encoder", "encoder")(layers=layers)
    if not isinstance(encoder, encoders.MultiLayerEncoder):
        raise ConfigError(f"encoder._target_={node._target_!r} returned a {type(encoder).__name__}, "
                          f"not a stx.engine.encoders.MultiLayerEncoder.")
    return encoder


def encoder_identity(node: DictConfig) -> dict[str, Any]:
    """The settings of an ``encoder`` config that make the encoder what it is, resolved: all of them
    but its layer sets, and ``seed`` when the weights are trained (the seed only draws random weights)."""
    settings = OmegaConf.to_container(node, resolve=True)
    settings.pop(ENCODER_LAYER_SETS, None)
    if settings.get("weights") != "random":
        settings.pop("seed", None)
    return settings


ENCODERS_KEPT = 4
_encoders: dict[tuple, encoders.MultiLayerEncoder] = {}
"""The encoders last built in this process (at most :data:`ENCODERS_KEPT`), by config, layers and device."""


def shared_encoder(node: DictConfig, layers: frozenset[str], device: torch.device) -> encoders.MultiLayerEncoder:
    """The encoder of config ``node`` reading ``layers``, on ``device``: the one built for an earlier job
    of this process with the same settings and weights file, else a new one. Encoders are frozen and hold
    no state between passes, so jobs share one (a sweep builds and loads it once, and a batched sweep's
    jobs can share its passes: :mod:`stx.engine.batching`)."""
    key = (repr(encoder_identity(node)), tuple(sorted(layers)), str(device), file_stamp(Path(str(node.get("weights")))))
    if key not in _encoders:
        encoder = build_encoder(node, layers)
        while len(_encoders) >= ENCODERS_KEPT:
            _encoders.pop(next(iter(_encoders)))
        _encoders[key] = encoder.to(device)
    return _encoders[key]
