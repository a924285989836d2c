"""Config schema, resolvers and the translation of a composed config into runnable objects.

The YAML tree in ``conf/`` is composed by Hydra on top of :class:`StxSchema`, so types and
key names are checked at composition. :func:`build_job` then checks values and instantiates
the encoder, losses and optimiser (``_target_`` + ``hydra.utils.instantiate``), reads the
images, and raises :class:`~stx.errors.StxError` with a one-paragraph message on the first
problem, all before any optimisation or tracking starts.
"""

from __future__ import annotations

import inspect
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch
from hydra.core.config_store import ConfigStore
from hydra.errors import InstantiationException
from hydra.utils import get_object, instantiate, to_absolute_path
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from stx import encoders, losses, memory
from stx.errors import ConfigError
from stx.image import long_edge_shape, read_image, resize
from stx.optim import (
    INITS,
    Checkpoint,
    CheckpointCallback,
    OptimizerFactory,
    PyramidLevel,
    StepCallback,
    autocast,
    optimise_image,
    style_edge,
)

PACKAGE_DIR = Path(__file__).resolve().parent
CONF_DIR = PACKAGE_DIR.parent / "conf"
ASSETS_DIR = PACKAGE_DIR / "assets"


def runs_dir() -> str:
    """Where outputs go: ``$STX_RUNS_DIR``, else ``<repo>/runs`` (absolute)."""
    return str(Path(os.environ.get("STX_RUNS_DIR") or PACKAGE_DIR.parent / "runs").resolve())


OmegaConf.register_new_resolver("stx.runs_dir", runs_dir, replace=True)
OmegaConf.register_new_resolver("stx.asset", lambda name: str(ASSETS_DIR / name), replace=True)
OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b), replace=True)


@dataclass
class EncoderSchema:
    _target_: str = "stx.encoders.vgg19"
    _partial_: bool = True
    weights: str = "imagenet"
    pooling: str = "max"
    seed: int = 0


@dataclass
class LevelSchema:
    size: int = MISSING
    steps: int = MISSING


@dataclass
class ScheduleSchema:
    optimizer: Dict[str, Any] = field(default_factory=dict)
    size: int = 256
    steps: int = 200
    levels: List[LevelSchema] = field(default_factory=list)
    init: str = "content"
    style_scale: float = 1.0
    checkpoint_every: int = 0


@dataclass
class ImagesSchema:
    content: str = MISSING
    styles: List[str] = MISSING
    style_weights: Optional[List[float]] = None


@dataclass
class TrackingSchema:
    uri: Optional[str] = None
    artifact_location: Optional[str] = None
    experiment: str = "stx"
    metrics_every: int = 1
    image_every: int = 50


@dataclass
class StxSchema:
    encoder: EncoderSchema = field(default_factory=EncoderSchema)
    loss: Dict[str, Any] = field(default_factory=dict)
    schedule: ScheduleSchema = field(default_factory=ScheduleSchema)
    images: ImagesSchema = field(default_factory=ImagesSchema)
    tracking: TrackingSchema = field(default_factory=TrackingSchema)
    device: str = "auto"
    precision: str = "fp32"
    seed: int = 0
    output: str = "output.png"
    runs_dir: str = MISSING
    resume: Optional[str] = None


ConfigStore.instance().store(name="stx_schema", node=StxSchema)


@dataclass
class Job:
    """Everything one run needs, built and checked from a config."""

    objective: losses.PerceptualObjective
    content: torch.Tensor
    styles: list[torch.Tensor]
    style_weights: list[float]
    levels: list[PyramidLevel]
    optimizer: OptimizerFactory
    init: str
    seed: int
    style_scale: float
    precision: str
    device: torch.device
    checkpoint_every: int = 0

    @property
    def steps(self) -> int:
        return sum(level.steps for level in self.levels)

    def run(
        self,
        callback: StepCallback | None = None,
        on_checkpoint: CheckpointCallback | None = None,
        start: Checkpoint | None = None,
    ) -> torch.Tensor:
        """Optimise the image (see :func:`stx.optim.optimise_image`); return it on the job's device."""
        return optimise_image(
            self.objective,
            self.content,
            self.styles,
            self.style_weights,
            self.levels,
            self.optimizer,
            init=self.init,
            seed=self.seed,
            style_scale=self.style_scale,
            precision=self.precision,
            callback=callback,
            checkpoint_every=self.checkpoint_every,
            on_checkpoint=on_checkpoint,
            start=start,
        )


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


def _target(node: DictConfig, where: str, kind: type | None = None, module: Any = None) -> Any:
    """The object named by ``node._target_``, checked to be a ``kind`` subclass or in ``module``."""
    name = node.get("_target_") if isinstance(node, DictConfig) else None
    if not name:
        raise ConfigError(f"{where} needs a _target_ naming what to build (e.g. stx.losses.GramStyleLoss).")
    try:
        target = get_object(name)
    except Exception as exc:
        raise ConfigError(f"{where}._target_={name!r} cannot be imported ({exc}).") from exc
    if kind is not None and not (inspect.isclass(target) and issubclass(target, kind)):
        raise ConfigError(f"{where}._target_={name!r} is not a {kind.__module__}.{kind.__qualname__}.")
    if module is not None and getattr(target, "__module__", None) != module.__name__:
        raise ConfigError(f"{where}._target_={name!r} is not an encoder from {module.__name__}.")
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


def _instantiate(node: DictConfig, where: str, **kwargs: Any) -> Any:
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as exc:
        cause = exc.__cause__
        if isinstance(cause, ConfigError):
            raise ConfigError(f"{where}: {cause}") from cause
        raise ConfigError(f"{where} could not be built: {cause or exc}") from exc


def build_losses(loss_cfg: DictConfig) -> dict[str, losses.Loss]:
    """Instantiate every term of the loss set (each must be a :class:`stx.losses.Loss`)."""
    terms = {}
    for name, node in loss_cfg.items():
        _target(node, f"loss.{name}", kind=losses.Loss)
        terms[str(name)] = _instantiate(node, f"loss.{name}")
    if not terms:
        raise ConfigError("the loss set is empty: choose one, e.g. loss=gatys, loss=gatys_tv or loss=mrf.")
    return terms


def build_optimizer(node: DictConfig) -> tuple[OptimizerFactory, torch.optim.Optimizer]:
    """The optimiser factory, and an optimiser it made for a dummy parameter (so that bad
    settings fail now, and its defaults can be read)."""
    _target(node, "schedule.optimizer", kind=torch.optim.Optimizer)
    factory = _instantiate(node, "schedule.optimizer")
    try:
        probe = factory([torch.zeros(1, requires_grad=True)])
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"schedule.optimizer is not valid: {exc}") from exc
    return factory, probe


def build_levels(schedule: DictConfig) -> list[PyramidLevel]:
    levels = [PyramidLevel(int(level.size), int(level.steps)) for level in schedule.levels]
    if not levels:
        raise ConfigError("schedule.levels is empty: give at least one {size: …, steps: …}.")
    return levels


def _style_weights(images: DictConfig) -> list[float]:
    count = len(images.styles)
    if count == 0:
        raise ConfigError("images.styles is empty: give at least one style image path.")
    weights = [1.0] * count if images.style_weights is None else [float(w) for w in images.style_weights]
    if len(weights) != count:
        raise ConfigError(
            f"images.style_weights has {len(weights)} value(s) for {count} style image(s); give one "
            f"weight per style, or leave it null for equal weights."
        )
    if not all(math.isfinite(w) and w >= 0 for w in weights) or sum(weights) <= 0:
        raise ConfigError(f"images.style_weights={weights} is not valid: use finite weights >= 0, not all zero.")
    return weights


def build_job(cfg: DictConfig) -> Job:
    """Check ``cfg`` and build the :class:`Job` it describes (raises :class:`ConfigError`)."""
    try:
        OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
    except OmegaConfBaseException as exc:
        raise ConfigError(f"the config cannot be resolved: {exc}") from exc
    device = resolve_device(cfg.device)
    autocast(device, cfg.precision)
    if cfg.schedule.init not in INITS:
        raise ConfigError(f"schedule.init={cfg.schedule.init!r} is not valid; use one of {', '.join(INITS)}.")
    style_scale = float(cfg.schedule.style_scale)
    if not (math.isfinite(style_scale) and style_scale > 0):
        raise ConfigError(f"schedule.style_scale={style_scale!r} is not valid: use a number > 0.")
    levels = build_levels(cfg.schedule)
    if cfg.schedule.checkpoint_every < 0:
        raise ConfigError(f"schedule.checkpoint_every={cfg.schedule.checkpoint_every} is not valid: use 0 (off) or a number of steps.")
    optimizer, probe = build_optimizer(cfg.schedule.optimizer)
    terms = build_losses(cfg.loss)
    style_weights = _style_weights(cfg.images)

    _target(cfg.encoder, "encoder", module=encoders)
    layers = frozenset().union(*(term.layers for term in terms.values()))
    encoder = _instantiate(cfg.encoder, "encoder")(layers=layers) if layers else None
    objective = losses.PerceptualObjective(encoder, terms).to(device)

    size = max(level.size for level in levels)
    content = read_image(to_absolute_path(cfg.images.content))
    state_images = 2 * probe.defaults["history_size"] + 3 if isinstance(probe, torch.optim.LBFGS) else 2
    estimate = memory.estimate_bytes(objective, *long_edge_shape(*content.shape[-2:], size), state_images, len(cfg.images.styles))
    memory.check_fits(estimate, device, size)
    content = resize(content, size).to(device)
    styles = [read_image(to_absolute_path(path), style_edge(size, style_scale)).to(device) for path in cfg.images.styles]
    return Job(
        objective=objective,
        content=content,
        styles=styles,
        style_weights=style_weights,
        levels=levels,
        optimizer=optimizer,
        init=cfg.schedule.init,
        seed=int(cfg.seed),
        style_scale=style_scale,
        precision=cfg.precision,
        device=device,
        checkpoint_every=int(cfg.schedule.checkpoint_every),
    )

