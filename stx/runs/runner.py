"""One stx job: build and check it, then optimise it inside one MLflow run and write the result."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import psutil
import torch
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf

from stx.engine import batching
from stx.engine.image import image_shape, long_edge_shape, write_image
from stx.engine.optim import Checkpoint, optimise_image
from stx.engine.plan import HEADROOM, available_bytes
from stx.errors import NonFiniteLossError, StxError, WriteError
from stx.runs import hydra_job, interrupts, joblog, layout
from stx.runs.job import Job, build_job, build_schedule
from stx.runs.monitor import JobMonitor
from stx.runs.tracking import RunTracker, TrackingError, device_tags, hydra_tags, open_ahead, source_tags, tracking_uri

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)


@dataclass
class JobResult:
    """A finished job: its MLflow run, output file, final total loss, final quality metrics
    (``{metric: value}``, see :mod:`stx.engine.judge`) and what it returns to the sweeper."""

    run_id: str
    output: Path
    total: float
    evaluation: dict[str, float]
    objective: float | list[float]


RESUME_KEEPS = ("resume", "tracking", "tracking.uri", "runs_dir")
"""Overrides that only choose where a resumed run is found and where the resumed job writes."""
RESUME_CHANGES = ("schedule.steps", "schedule.checkpoint_every", "tracking.metrics_every", "tracking.image_every",
                  "tracking.flush_seconds")
"""Overrides a resumed run honours; they are recorded in its ``config.yaml`` and the tag
``stx.resume.changed``. Any other override is refused: the run would no longer be one job."""


def hydra_task(cfg: DictConfig) -> float | list[float]:
    """The Hydra task: run the job in Hydra's run dir; return its objective (``cfg.objective``)."""
    hydra_cfg = hydra_job.config()
    run_dir = Path(hydra_cfg.runtime.output_dir)
    log_file = run_dir / f"{hydra_cfg.job.name}.log"
    started_at = _job_started_at()
    if cfg.resume:
        overrides = OmegaConf.to_container(hydra_cfg.overrides.task)
        return resume(cfg, run_dir, log_file, overrides, started_at=started_at).objective
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    tags = hydra_tags(hydra_cfg)
    if multirun:
        tags[layout.TAG_JOB_NUM] = str(hydra_cfg.job.num)
        swept = [key for key in os.environ.get(layout.SWEPT_KEYS_ENV, "").split(",") if key]
        tags[layout.TAG_RUN_NAME] = layout.run_name(tags[layout.TAG_OVERRIDES], swept) or f"job {hydra_cfg.job.num}"
    elif name := layout.run_name(tags[layout.TAG_OVERRIDES]):  # else MLflow names it (two words and a number)
        tags[layout.TAG_RUN_NAME] = name
    parent = os.environ.get(layout.PARENT_RUN_ENV) if multirun else None
    return run_tracked(cfg, run_dir, tags, parent_run_id=parent, log_file=log_file, started_at=started_at).objective


_first_job = True
"""Whether no job has started in this process yet (a sweep's basic launcher runs its jobs one
after another in one process)."""


def _job_started_at() -> float:
    """Where this job's start-up (``perf/startup_seconds``) counts from, unix time: the process's
    start for its first job, else the moment the job began (the jobs before it are not its cost)."""
    global _first_job
    first, _first_job = _first_job, False
    return psutil.Process().create_time() if first else time.time()


def resume(cfg: DictConfig, run_dir: Path, log_file: Path | None = None, overrides: Sequence[str] = (), *,
           started_at: float | None = None) -> JobResult:
    """Continue run ``cfg.resume`` (in the configured store) from its last checkpoint, with the
    config and inputs it logged; the same MLflow run is reopened and ends FINISHED.

    ``overrides`` are the command line's: those in :data:`RESUME_CHANGES` take their value from
    ``cfg`` (``schedule.steps`` sets the steps of the checkpoint's pyramid level and the later
    ones; levels already finished keep theirs), any other but :data:`RESUME_KEEPS` is refused.
    """
    from mlflow.exceptions import MlflowException  # MLflow loads here only when a run is resumed

    from stx.runs.store import check_not_running, opened

    run_id = cfg.resume
    changed = _resume_overrides(run_id, overrides)
    client = opened(tracking_uri(cfg.tracking))
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        raise StxError(f"resume={run_id!r}: no such run in {cfg.tracking.uri}.") from exc
    if run.info.status == "FINISHED":
        raise StxError(f"resume={run_id!r}: that run is already FINISHED; there is nothing to continue.")
    check_not_running(run)  # before anything of the run is rewritten
    original = layout.load_run_config(client, run_id, run_dir, cfg.runs_dir, cfg.tracking.uri)
    every = original.schedule.checkpoint_every
    hint = (f"it stopped before its first checkpoint (schedule.checkpoint_every={every}), so there is nothing to resume "
            f"from; run it again (stx reproduce {run_id})" if every else
            "it ran without schedule.checkpoint_every, so there is nothing to resume from")
    path = layout.download_artifact(client, run_id, layout.CHECKPOINT, run_dir / "resumed_from", hint=hint)
    start, owner = layout.load_checkpoint(path)
    _check_checkpoint(start, owner, original, run_id)
    updates = _resume_updates(run_id, original, cfg, changed, start.step, start.level)
    if updates:
        note = "; ".join(f"{key} {OmegaConf.select(original, key)} -> {value}" for key, value in updates.items())
        _apply(original, updates)
        build_schedule(original)  # refuses a bad value before the run records it
        _record_resume_changes(client, run, updates, f"{note} (at step {start.step})", run_dir / "resumed_from")
        log.info("resume: %s", note)
    log.info("resuming run %s at step %d", run_id, start.step)
    tags = {layout.TAG_RESUMED_AT_STEP: str(start.step)}
    return run_tracked(original, run_dir, tags, log_file=log_file, resume_run_id=run_id, start=start,
                       started_at=started_at)


def _check_checkpoint(start: Checkpoint, owner: str | None, cfg: DictConfig, run_id: str) -> None:
    """Refuse a checkpoint that another run wrote (``owner``, its writer's run id; None before stx
    named it) or that does not fit the run's config: its level, its step within that level, and its
    image (``1×3×H×W`` at the level's size)."""
    levels = cfg.schedule.levels
    whole = lambda value: isinstance(value, int) and not isinstance(value, bool)
    problem = None
    if owner is not None and owner != run_id:
        problem = f"it names run {owner!r} as its writer (copied from another run)"
    elif not (whole(start.step) and whole(start.level) and isinstance(start.best_loss, (int, float))
            and isinstance(start.parameter, torch.Tensor) and isinstance(start.best, torch.Tensor)):
        problem = "its step, level, loss or images are not of the types stx writes"
    elif not 0 <= start.level < len(levels):
        problem = f"it is at pyramid level {start.level}, but the run has {len(levels)} level(s)"
    else:
        first = sum(level.steps for level in levels[:start.level])
        last = first + levels[start.level].steps
        shape = (1, 3, *long_edge_shape(*image_shape(cfg.images.content), levels[start.level].size))
        if not first <= start.step <= last:
            problem = f"its step {start.step} is outside its level's steps {first}–{last}"
        elif tuple(start.parameter.shape) != shape or tuple(start.best.shape) != shape:
            problem = f"its images are {tuple(start.parameter.shape)}, not {shape} as the level's size makes them"
    if problem:
        raise StxError(f"the checkpoint of run {run_id} does not fit the run's config: {problem}; it was edited or "
                       f"replaced. Start a new run (stx reproduce {run_id}) instead of resuming this one.")


def _resume_overrides(run_id: str, overrides: Sequence[str]) -> list[str]:
    """The keys of ``overrides`` that change a resumed run; any override it cannot honour is refused."""
    keys = [override.key_or_group for override in OverridesParser.create().parse_overrides(list(overrides))]
    refused = [override for override, key in zip(overrides, keys) if key not in RESUME_KEEPS + RESUME_CHANGES]
    if refused:
        raise StxError(
            f"resume={run_id} continues the run with the config it logged, so {', '.join(refused)} cannot be "
            f"applied (the result would be neither the old run nor a new one). On resume only "
            f"{', '.join(RESUME_CHANGES)} can change, and {', '.join(RESUME_KEEPS[1:])} choose the store and "
            f"the runs folder; for other settings start a new run."
        )
    return [key for key in keys if key in RESUME_CHANGES]


def _resume_updates(
    run_id: str, logged: DictConfig, cfg: DictConfig, keys: list[str], step: int, level: int
) -> dict[str, Any]:
    """Dotted key → new value for the overridden ``keys`` (values from ``cfg``), leaving out those
    the logged config already has; the checkpoint was taken after ``step`` steps, in pyramid ``level``."""
    updates = {key: OmegaConf.select(cfg, key) for key in keys}
    if "schedule.steps" in updates:
        steps, levels = updates["schedule.steps"], logged.schedule.levels
        done = step - sum(finished.steps for finished in levels[:level])
        if steps < done:
            raise StxError(
                f"resume={run_id}: schedule.steps={steps} ends before the checkpoint it resumes from (step "
                f"{step}, {done} steps into pyramid level {level}); give schedule.steps={done} or more."
            )
        updates.update({f"schedule.levels.{index}.steps": steps for index in range(level, len(levels))})
    return {key: value for key, value in updates.items() if OmegaConf.select(logged, key) != value}


def _apply(cfg: DictConfig, updates: dict[str, Any]) -> None:
    for key, value in updates.items():
        OmegaConf.update(cfg, key, value)


def _record_resume_changes(client: MlflowClient, run: Run, updates: dict[str, Any], note: str, folder: Path) -> None:
    """Write ``updates`` into the run's logged ``config.yaml`` (what a later resume or
    ``stx reproduce`` reads) and add ``note`` to its tag ``stx.resume.changed``."""
    run_id = run.info.run_id
    logged = layout.read_logged_config(layout.download_artifact(client, run_id, layout.CONFIG, folder), run_id)
    _apply(logged, updates)
    client.log_dict(run_id, OmegaConf.to_container(logged), layout.CONFIG)
    previous = run.data.tags.get(layout.TAG_RESUME_CHANGED)
    client.set_tag(run_id, layout.TAG_RESUME_CHANGED, f"{previous}; {note}" if previous else note)


def run_tracked(
    cfg: DictConfig,
    run_dir: Path,
    tags: dict[str, str],
    *,
    parent_run_id: str | None = None,
    log_file: Path | None = None,
    resume_run_id: str | None = None,
    start: Checkpoint | None = None,
    started_at: float | None = None,
) -> JobResult:
    """Run the job described by ``cfg``, writing into ``run_dir`` and one MLflow run.

    All checks (config values, images, weights, tracking store) happen before the MLflow run
    starts. If the loss turns non-finite or the job is interrupted (Ctrl-C, SIGTERM), the
    latest image is still written and logged and the run is marked FAILED or KILLED; if the
    store fails, the job stops at once, writes its latest image (metrics are in ``metrics.csv``)
    and raises a :class:`TrackingError` listing what is on disk. ``log_file`` is logged in every
    case the store allows. With ``resume_run_id`` and ``start``, that run is reopened and
    continued from the checkpoint, without logging again the steps it had logged. At the end
    the output is scored (``eval/…``), the job's cost logged (``perf/…``, start-up counted from
    ``started_at``, unix time, default now) and its objective computed (``objective``).
    """
    started_at = time.time() if started_at is None else started_at
    open_ahead(cfg.tracking)
    job = build_job(cfg)
    tracker = RunTracker(cfg.tracking, run_dir)
    tags = {**tags, **source_tags(), **device_tags(job.device), layout.TAG_RUN_DIR: str(run_dir),
            layout.TAG_OUTPUT: cfg.output, layout.TAG_JUDGE: job.judge.name,
            layout.TAG_WEIGHTS: job.loss.encoder.weights if job.loss.encoder is not None else "none",
            layout.TAG_TILE: str(getattr(job.loss, "tile", "off"))}
    if (batch := batching.active()) is not None:
        tags[layout.TAG_BATCHED] = "true"
        tags[layout.TAG_BATCH_SIZE] = str(batch.size)
    if cfg.schedule.tile == "auto":
        log.info("schedule.tile=auto: %s", f"tiled with {job.loss.tile} px tiles" if hasattr(job.loss, "tile")
                 else "the job fits untiled")
    previous_handlers = interrupts.stop_on_signals()
    with _memory_held(job):
        started = time.perf_counter()
        try:
            with tracker.open(tags, parent_run_id, resume_run_id, log_file) as run_id:
                if resume_run_id is None:
                    tracker.log_config(cfg, run_dir, tags)
                    tracker.log_inputs(job.content_path, job.style_paths, job.init_path)
                log.info("MLflow run %s in %s; %d steps on %s", run_id, tracker.uri, job.schedule.steps, job.device)
                joblog.to_file(joblog.summary(cfg, tags))
                kept = None  # what the job leaves: (name prefix, image, step), written and logged in one place
                with JobMonitor(tracker, run_dir, job.schedule.steps, evaluate=job.judge, present=job.color.finish,
                                started_at=started_at, first_step=start.step if start else 0) as monitor:
                    try:
                        image = optimise_image(job.loss, content=job.content, styles=job.styles,
                                               style_weights=job.style_weights, schedule=job.schedule,
                                               callback=monitor, start=start, initial=job.initial)
                        kept = "", job.color.finish(image), job.schedule.steps
                    except NonFiniteLossError as error:
                        kept = layout.LAST_FINITE, job.color.finish(error.image), error.step - 1
                        raise
                    except (KeyboardInterrupt, TrackingError):
                        if monitor.latest is not None:
                            kept = layout.INTERRUPTED, monitor.latest_result(), monitor.latest.step
                        raise
                    finally:
                        if kept is not None:
                            output = _save(tracker, kept[1], run_dir / (kept[0] + cfg.output), kept[2])
                image = kept[1]
                evaluation = monitor.log_evaluation(image, job.schedule.steps)
                tracker.log_metrics(monitor.performance(job.device), job.schedule.steps)
                objective = job.objective(evaluation)
                tracker.log_metrics(job.objective.logged(objective), job.schedule.steps)
                tracker.describe(output, {**job.objective.logged(objective), **evaluation})
                joblog.to_file(f"result: output {output}; " + ", ".join(f"{k} {v:.4g}" for k, v in evaluation.items())
                               + f"; objective {objective}")
        except TrackingError as error:
            if tracker.run_id is None:
                raise
            on_disk = [path.name for path in sorted(run_dir.glob("*.*")) if path.is_file()]
            closing = (f"MLflow run {tracker.run_id} is closed FAILED" if isinstance(error, WriteError) else
                       f"MLflow run {tracker.run_id} stays RUNNING until the next stx job on this store finds its process "
                       f"gone and closes it as FAILED")
            raise TrackingError(
                f"{error}. stx stopped; what the job computed is on disk in {run_dir}: {', '.join(on_disk)}. {closing}."
            ) from error
        finally:
            interrupts.restore(previous_handlers)
    # resumed at its last step, a run takes no step: its loss is the checkpoint's
    total = monitor.latest.values["total"] if monitor.latest is not None else start.best_loss if start else float("nan")
    hydra_job.say(
        f"stx: done in {time.perf_counter() - started:.1f} s, final loss {total:.6g}, style distance "
        f"{evaluation['style_distance']:.4g}, content distance {evaluation['content_distance']:.4g}; output {output}; "
        f"MLflow run {run_id} (experiment '{cfg.tracking.experiment}', {tracker.uri})"
    )
    return JobResult(run_id, output, total, evaluation, objective)


def _memory_held(job: Job) -> contextlib.AbstractContextManager:
    """In a batched sweep (:mod:`stx.engine.batching`), hold the job's planned memory against what the
    device had free while it runs (waiting while the jobs running leave too little); else nothing."""
    batch = batching.active()
    if batch is None:
        return contextlib.nullcontext()
    return batch.reserve(job.memory, job.device, lambda device: int(HEADROOM * available_bytes(device)))


def _save(tracker: RunTracker, image: torch.Tensor, path: Path, step: int) -> Path:
    write_image(image, path)
    tracker.log_output(image, path, step)
    return path
