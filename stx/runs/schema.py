"""The config schema: key names and types of the composed config (no torch, no mlflow).

Hydra composes the YAML tree in ``conf/`` on top of :class:`StxSchema`, so a typo'd key or a
value of the wrong type fails at composition. The schema states types only: every default
value lives once, in the YAML files (``conf/config.yaml`` and the group options). Values are
checked by the code that owns them, when :func:`stx.runs.job.build_job` builds the job.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf

CONF_PACKAGE = "stx.conf"
"""The config tree: ``conf/`` in the repository, the package ``stx.conf`` once installed."""
CONF_DIR = Path(str(files(CONF_PACKAGE)))
ASSETS_DIR = Path(__file__).resolve().parents[1] / "assets"


def runs_dir() -> str:
    """Where outputs go: ``$STX_RUNS_DIR``, else ``runs/`` in the folder stx was started in (absolute)."""
    return str(Path(os.environ.get("STX_RUNS_DIR") or "runs").resolve())


OmegaConf.register_new_resolver("stx.runs_dir", runs_dir, replace=True)
OmegaConf.register_new_resolver("stx.asset", lambda name: str(ASSETS_DIR / name), replace=True)
OmegaConf.register_new_resolver("floordiv", lambda a, b: int(a) // int(b), replace=True)


@dataclass
class EncoderLayersSchema:
    """The layers (``{layer: weight}``) the loss options read on an encoder: ``content``, ``style``
    and ``patch`` (MRF)."""

    content: Dict[str, float] = MISSING
    style: Dict[str, float] = MISSING
    patch: Dict[str, float] = MISSING


@dataclass
class EncoderSchema:
    _target_: str = MISSING
    _partial_: bool = MISSING
    layers: EncoderLayersSchema = field(default_factory=EncoderLayersSchema)
    weights: str = MISSING
    pooling: str = MISSING
    seed: int = MISSING
    softmax: Optional[float] = MISSING


@dataclass
class LevelSchema:
    size: int = MISSING
    steps: int = MISSING


@dataclass
class ScheduleSchema:
    optimizer: Dict[str, Any] = MISSING
    size: int = MISSING
    steps: int = MISSING
    levels: List[LevelSchema] = MISSING
    init: str = MISSING
    init_image: Optional[str] = MISSING
    bounds: str = MISSING
    max_rise: float = MISSING
    style_scale: float = MISSING
    checkpoint_every: int = MISSING
    tile: str = MISSING
    cuda_graph: bool = MISSING


@dataclass
class ImagesSchema:
    content: str = MISSING
    styles: List[str] = MISSING
    style_weights: Optional[List[float]] = MISSING


@dataclass
class TrackingSchema:
    uri: Optional[str] = MISSING
    artifact_location: Optional[str] = MISSING
    experiment: str = MISSING
    metrics_every: int = MISSING
    image_every: int = MISSING
    flush_seconds: float = MISSING
    system_metrics: bool = MISSING


@dataclass
class ObjectiveSchema:
    metrics: Dict[str, float] = MISSING
    limits: Dict[str, float] = MISSING
    penalty: float = MISSING
    pareto: bool = MISSING


@dataclass
class JudgeSchema:
    arch: str = MISSING
    weights: str = MISSING


@dataclass
class TaskSchema:
    """What image optimisation (``stx``) and training (``stx train``) configs share."""

    encoder: EncoderSchema = field(default_factory=EncoderSchema)
    loss: Dict[str, Any] = MISSING
    images: ImagesSchema = field(default_factory=ImagesSchema)
    tracking: TrackingSchema = field(default_factory=TrackingSchema)
    objective: ObjectiveSchema = field(default_factory=ObjectiveSchema)
    judge: JudgeSchema = field(default_factory=JudgeSchema)
    device: str = MISSING
    seed: int = MISSING
    runs_dir: str = MISSING
    resume: Optional[str] = MISSING


@dataclass
class StxSchema(TaskSchema):
    color: Dict[str, Any] = MISSING
    schedule: ScheduleSchema = field(default_factory=ScheduleSchema)
    precision: str = MISSING
    output: str = MISSING


ConfigStore.instance().store(name="stx_schema", node=StxSchema)


@dataclass
class DataSchema:
    content_dir: str = MISSING
    crop: int = MISSING
    holdout: int = MISSING
    eval_size: int = MISSING
    workers: int = MISSING


@dataclass
class PruneSchema:
    amount: float = MISSING
    importance: str = MISSING


@dataclass
class TemporalSchema:
    weight: float = MISSING
    shift: float = MISSING
    elastic: float = MISSING


@dataclass
class DistillSchema:
    teacher: Optional[str] = MISSING
    weight: float = MISSING


@dataclass
class TrainerSchema:
    optimizer: Dict[str, Any] = MISSING
    lr_schedule: Optional[Dict[str, Any]] = MISSING
    batch_size: int = MISSING
    steps: int = MISSING
    style_size: int = MISSING
    checkpoint_every: int = MISSING
    export: List[str] = MISSING


@dataclass
class TrainTrackingSchema(TrackingSchema):
    register_as: Optional[str] = MISSING


@dataclass
class TrainSchema(TaskSchema):
    """``stx train`` (conf/train.yaml): a feed-forward model trained on a folder of content images."""

    tracking: TrainTrackingSchema = field(default_factory=TrainTrackingSchema)
    model: Dict[str, Any] = MISSING
    data: DataSchema = field(default_factory=DataSchema)
    trainer: TrainerSchema = field(default_factory=TrainerSchema)
    distill: DistillSchema = field(default_factory=DistillSchema)
    start_from: Optional[str] = MISSING
    prune: PruneSchema = field(default_factory=PruneSchema)
    temporal: TemporalSchema = field(default_factory=TemporalSchema)


ConfigStore.instance().store(name="stx_train_schema", node=TrainSchema)
