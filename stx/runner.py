"""One stx job: check and build everything, then optimise with tracking and write the result."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import to_absolute_path
from omegaconf import DictConfig
from tqdm import tqdm

from stx.config import build_job
from stx.errors import NonFiniteLossError
from stx.image import write_image
from stx.optim import StepInfo
from stx.tracking import RunTracker, device_tags, hydra_tags, source_tags

log = logging.getLogger(__name__)

PARENT_RUN_ENV = "STX_PARENT_RUN_ID"
"""Set by the sweep callback in each job's process: the sweep's parent MLflow run."""


@dataclass
class JobResult:
    run_id: str
    output: Path
    total: float


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def run_job(cfg: DictConfig) -> float:
    """The Hydra task: run the job in Hydra's run dir; return the final total loss."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    tags = hydra_tags(hydra_cfg)
    if multirun:
        tags["stx.sweep.job_num"] = str(hydra_cfg.job.num)
    run_dir = Path(hydra_cfg.runtime.output_dir)
    parent = os.environ.get(PARENT_RUN_ENV) if multirun else None
    return execute(cfg, run_dir, tags, parent, log_file=run_dir / f"{hydra_cfg.job.name}.log").total


def execute(
    cfg: DictConfig,
    run_dir: Path,
    tags: dict[str, str],
    parent_run_id: str | None = None,
    log_file: Path | None = None,
) -> JobResult:
    """Run the job described by ``cfg``, writing into ``run_dir`` and one MLflow run.

    All checks (config values, images, weights, tracking store) happen before the MLflow run
    starts. If the loss turns non-finite or the job is interrupted (Ctrl-C, SIGTERM), the
    latest image is still written and logged and the run is marked FAILED or KILLED.
    """
    job = build_job(cfg)
    tracker = RunTracker(cfg.tracking)
    tags = {**tags, **source_tags(), **device_tags(job.device), "stx.run_dir": str(run_dir)}
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    latest: dict[str, StepInfo] = {}
    started = time.perf_counter()
    try:
        with tracker.run(tags, parent_run_id) as run_id:
            tracker.log_config(cfg, run_dir)
            tracker.log_inputs(to_absolute_path(cfg.images.content), [to_absolute_path(p) for p in cfg.images.styles])
            log.info("MLflow run %s in %s; %d steps on %s", run_id, tracker.uri, job.steps, job.device)
            # a redrawn bar on a terminal; a line every 30 s in logs (batch jobs, CI)
            interval = 0.1 if sys.stderr.isatty() else 30.0
            with tqdm(total=job.steps, desc="stx", unit="step", dynamic_ncols=True, mininterval=interval) as progress:

                def on_step(info: StepInfo) -> None:
                    latest["info"] = info
                    tracker.log_step(info)
                    progress.set_postfix(loss=f"{info.terms['total']:.4g}", size=info.size, refresh=False)
                    progress.update()

                try:
                    image = job.run(on_step)
                except NonFiniteLossError as error:
                    _save(tracker, error.image, run_dir / f"last_finite_{cfg.output}", error.step - 1)
                    raise
                except KeyboardInterrupt:
                    if "info" in latest:
                        _save(tracker, latest["info"].image, run_dir / f"interrupted_{cfg.output}", latest["info"].step)
                    raise
            output = _save(tracker, image, run_dir / cfg.output, job.steps)
            if log_file is not None:
                tracker.log_file(log_file)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    total = latest["info"].terms["total"] if "info" in latest else float("nan")
    print(
        f"stx: done in {time.perf_counter() - started:.1f} s, final loss {total:.6g}; output {output}; "
        f"MLflow run {run_id} (experiment '{cfg.tracking.experiment}', {tracker.uri})",
        flush=True,
    )
    return JobResult(run_id, output, total)


def _save(tracker: RunTracker, image: torch.Tensor, path: Path, step: int) -> Path:
    write_image(image, path)
    tracker.log_output(image, path, step)
    return path
