"""One stx job: build and check it, then optimise it inside one MLflow run and write the result."""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig

from stx import layout
from stx.errors import NonFiniteLossError, StxError
from stx.image import write_image
from stx.job import build_job
from stx.monitor import JobMonitor
from stx.optim import Checkpoint, optimise_image
from stx.tracking import RunTracker, device_tags, hydra_tags, source_tags, tracking_uri

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    run_id: str
    output: Path
    total: float


def _raise_interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def hydra_task(cfg: DictConfig) -> float:
    """The Hydra task: run the job in Hydra's run dir; return the final total loss."""
    hydra_cfg = HydraConfig.get()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    log_file = run_dir / f"{hydra_cfg.job.name}.log"
    if cfg.resume:
        return resume(cfg, run_dir, log_file).total
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    tags = hydra_tags(hydra_cfg)
    if multirun:
        tags[layout.TAG_JOB_NUM] = str(hydra_cfg.job.num)
    parent = os.environ.get(layout.PARENT_RUN_ENV) if multirun else None
    return run_tracked(cfg, run_dir, tags, parent_run_id=parent, log_file=log_file).total


def resume(cfg: DictConfig, run_dir: Path, log_file: Path | None = None) -> JobResult:
    """Continue run ``cfg.resume`` (in the configured store) from its last checkpoint, with the
    config and inputs it logged; the same MLflow run is reopened and ends FINISHED."""
    run_id = cfg.resume
    client = MlflowClient(tracking_uri(cfg.tracking))
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise StxError(f"resume={run_id!r}: no such run in {cfg.tracking.uri}.") from exc
    if run.info.status == "FINISHED":
        raise StxError(f"resume={run_id!r}: that run is already FINISHED; there is nothing to continue.")
    original = layout.load_run_config(client, run_id, run_dir, cfg.runs_dir, cfg.tracking.uri)
    path = layout.download_artifact(client, run_id, layout.CHECKPOINT, run_dir / "resumed_from",
                                    hint="it ran without schedule.checkpoint_every, so there is nothing to resume from")
    start = layout.load_checkpoint(path)
    log.info("resuming run %s at step %d", run_id, start.step)
    tags = {layout.TAG_RESUMED_AT_STEP: str(start.step)}
    return run_tracked(original, run_dir, tags, log_file=log_file, resume_run_id=run_id, start=start)


def run_tracked(
    cfg: DictConfig,
    run_dir: Path,
    tags: dict[str, str],
    *,
    parent_run_id: str | None = None,
    log_file: Path | None = None,
    resume_run_id: str | None = None,
    start: Checkpoint | None = None,
) -> JobResult:
    """Run the job described by ``cfg``, writing into ``run_dir`` and one MLflow run.

    All checks (config values, images, weights, tracking store) happen before the MLflow run
    starts. If the loss turns non-finite or the job is interrupted (Ctrl-C, SIGTERM), the
    latest image is still written and logged and the run is marked FAILED or KILLED. With
    ``resume_run_id`` and ``start``, that run is reopened and continued from the checkpoint.
    """
    job = build_job(cfg)
    tracker = RunTracker(cfg.tracking)
    tags = {**tags, **source_tags(), **device_tags(job.device), layout.TAG_RUN_DIR: str(run_dir),
            layout.TAG_OUTPUT: cfg.output}
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    started = time.perf_counter()
    try:
        with tracker.open(tags, parent_run_id, resume_run_id) as run_id:
            if resume_run_id is None:
                tracker.log_config(cfg, run_dir)
                tracker.log_inputs(job.content_path, job.style_paths)
            log.info("MLflow run %s in %s; %d steps on %s", run_id, tracker.uri, job.schedule.steps, job.device)
            with JobMonitor(tracker, run_dir, job.schedule.steps, start.step if start else 0) as monitor:
                try:
                    image = optimise_image(job.objective, content=job.content, styles=job.styles,
                                           style_weights=job.style_weights, schedule=job.schedule,
                                           callback=monitor, start=start)
                except NonFiniteLossError as error:
                    _save(tracker, error.image, run_dir / (layout.LAST_FINITE + cfg.output), error.step - 1)
                    raise
                except KeyboardInterrupt:
                    if monitor.latest is not None:
                        _save(tracker, monitor.latest.image, run_dir / (layout.INTERRUPTED + cfg.output), monitor.latest.step)
                    raise
            output = _save(tracker, image, run_dir / cfg.output, job.schedule.steps)
            if log_file is not None:
                tracker.log_file(log_file)
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)
    total = monitor.latest.values["total"] if monitor.latest is not None else float("nan")
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
