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
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient
from omegaconf import DictConfig
from tqdm import tqdm

from stx.config import build_job
from stx.errors import NonFiniteLossError, StxError
from stx.image import write_image
from stx.optim import Checkpoint, StepInfo
from stx.tracking import (
    CHECKPOINT_DIR,
    RunTracker,
    device_tags,
    download_artifact,
    hydra_tags,
    load_run_config,
    source_tags,
    tracking_uri,
)

log = logging.getLogger(__name__)

CHECKPOINT_FILE = "checkpoint.pt"
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
    run_dir = Path(hydra_cfg.runtime.output_dir)
    log_file = run_dir / f"{hydra_cfg.job.name}.log"
    if cfg.resume:
        return resume(cfg, run_dir, log_file).total
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    tags = hydra_tags(hydra_cfg)
    if multirun:
        tags["stx.sweep.job_num"] = str(hydra_cfg.job.num)
    parent = os.environ.get(PARENT_RUN_ENV) if multirun else None
    return execute(cfg, run_dir, tags, parent, log_file=log_file).total


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
    original = load_run_config(client, run_id, run_dir, cfg.runs_dir, cfg.tracking.uri)
    path = download_artifact(client, run_id, f"{CHECKPOINT_DIR}/{CHECKPOINT_FILE}", run_dir / "resumed_from",
                             hint="it ran without schedule.checkpoint_every, so there is nothing to resume from")
    state = torch.load(path, map_location="cpu", weights_only=True)
    start = Checkpoint(state["step"], state["level"], state["image"], state["optimizer_state"])
    log.info("resuming run %s at step %d", run_id, start.step)
    tags = {"stx.resumed_at_step": str(start.step), "stx.run_dir": str(run_dir)}
    return execute(original, run_dir, tags, log_file=log_file, resume_run_id=run_id, start=start)


def execute(
    cfg: DictConfig,
    run_dir: Path,
    tags: dict[str, str],
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
    tags = {**tags, **source_tags(), **device_tags(job.device), "stx.run_dir": str(run_dir)}

    def on_checkpoint(checkpoint: Checkpoint) -> None:
        path = run_dir / CHECKPOINT_FILE
        torch.save({"step": checkpoint.step, "level": checkpoint.level, "image": checkpoint.image.cpu(),
                    "optimizer_state": checkpoint.optimizer_state}, path)
        tracker.log_checkpoint(path, checkpoint.step)

    previous_sigterm = signal.signal(signal.SIGTERM, _raise_interrupt)
    latest: dict[str, StepInfo] = {}
    started = time.perf_counter()
    try:
        with tracker.run(tags, parent_run_id, resume_run_id) as run_id:
            if resume_run_id is None:
                tracker.log_config(cfg, run_dir)
                tracker.log_inputs(to_absolute_path(cfg.images.content), [to_absolute_path(p) for p in cfg.images.styles])
            log.info("MLflow run %s in %s; %d steps on %s", run_id, tracker.uri, job.steps, job.device)
            # a redrawn bar on a terminal; a line every 30 s in logs (batch jobs, CI)
            interval = 0.1 if sys.stderr.isatty() else 30.0
            first = start.step if start else 0
            with tqdm(total=job.steps, initial=first, desc="stx", unit="step", dynamic_ncols=True, mininterval=interval) as progress:

                def on_step(info: StepInfo) -> None:
                    latest["info"] = info
                    tracker.log_step(info)
                    progress.set_postfix(loss=f"{info.terms['total']:.4g}", size=info.size, refresh=False)
                    progress.update()

                try:
                    image = job.run(on_step, on_checkpoint, start)
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
