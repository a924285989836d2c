"""The Python API, for notebooks and scripts: compose a config, run it, get the result.

    >>> from stx import api
    >>> result = api.run(["encoder.weights=random", "schedule.size=128", "images.content=me.jpg"])
    >>> result.run_id, result.output, result.metrics["total"]
    >>> result.image  # a Pillow image of the output

A run made here is tracked exactly as one started with the ``stx`` command (same MLflow run
layout, tags and artifacts; ``hydra.overrides`` holds the overrides), and writes into
``runs/<date>/<time>/`` of the runs folder.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from hydra import compose
from hydra._internal.hydra import Hydra
from hydra._internal.utils import create_config_search_path
from hydra.core.config_search_path import SearchPathQuery
from hydra.core.global_hydra import GlobalHydra
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from PIL import Image

from stx.runs import layout
from stx.runs.schema import CONF_PACKAGE


@dataclass
class RunResult:
    """What one run produced: its MLflow run id, the output file, the run's final metrics
    (``total``, each loss term, …) and the output image."""

    run_id: str
    output: Path
    metrics: dict[str, float]
    image: Image.Image


def compose_config(
    overrides: Sequence[str] = (), *, config_dir: str | Path | None = None, config_name: str = "config"
) -> DictConfig:
    """The composed config for ``overrides`` (the command line's ``key=value`` syntax).

    ``config_dir``: a folder of your own configs added to stx's (as ``stx -cd DIR``: new group
    options, presets, primary configs); ``config_name``: the primary config (as ``stx -cn NAME``).
    """
    # The search path the stx command builds (Hydra's compose API has no public way to add a
    # folder that may hold the primary config).
    search_path = create_config_search_path(f"pkg://{CONF_PACKAGE}")
    if config_dir is not None:
        search_path.prepend("command-line", Path(config_dir).resolve().as_uri(), anchor=SearchPathQuery(provider="schema"))
    GlobalHydra.instance().clear()
    Hydra.create_main_hydra2("stx", search_path)
    try:
        return compose(config_name, overrides=list(overrides))
    finally:
        GlobalHydra.instance().clear()


def run(
    overrides: Sequence[str] = (), *, config_dir: str | Path | None = None, config_name: str = "config"
) -> RunResult:
    """Compose (see :func:`compose_config`) and run one job; raises :class:`~stx.errors.StxError`
    for a mistake in the config or the inputs."""
    from stx.runs.runner import run_tracked  # torch loads only when a job runs

    cfg = compose_config(overrides, config_dir=config_dir, config_name=config_name)
    run_dir = Path(cfg.runs_dir) / datetime.now().strftime("%Y-%m-%d") / datetime.now().strftime("%H-%M-%S-%f")
    tags = {layout.TAG_OVERRIDES: " ".join(overrides)}
    result = run_tracked(cfg, run_dir, tags)
    metrics = MlflowClient(cfg.tracking.uri).get_run(result.run_id).data.metrics
    with Image.open(result.output) as image:
        return RunResult(result.run_id, result.output, dict(metrics), image.convert("RGB"))
