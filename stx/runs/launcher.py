"""The batched launcher (``hydra/launcher=stx_batched``, stx's default): a sweep's jobs run as
threads of the sweeping process, and jobs of the same shape share each evaluation of their encoder
(:mod:`stx.engine.batching`).

Jobs whose computation has the same shape (:func:`batch_key`: encoder, the layers their losses
read, pyramid levels' sizes, optimiser kind, bounds, tiling, content image, precision, device) form a
*group*; groups run one after another, and within a group up to ``batch_size`` jobs per device run
at once, each in its own thread through Hydra's task function as it would alone: its own run dir
and ``.hydra/`` files, log file, MLflow child run, metrics, images, checkpoints and outputs, so
``reproduce``, ``resume`` and ``promote`` work on it alone. What differs between them (score and
layer weights, learning rate, seed, init, style blend, colour control, style images, steps) stays
per run. The runs' planned memory (:func:`stx.engine.plan.plan_memory`) must fit together in what
the device had free; a job that would not waits for others to end.

With several GPUs (``device`` auto or cuda), the jobs of a group are dealt round-robin to them
(:func:`assign_devices`), one batch per device. Ctrl-C or SIGTERM stops every job at its next
evaluation: each writes its latest image and closes its run KILLED, then the sweep exits 130/143.
"""

from __future__ import annotations

import copy
import logging
import os
import signal
import threading
from collections.abc import Sequence
from concurrent.futures import Executor, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from hydra.core.utils import JobReturn, JobStatus, _save_config, configure_log, filter_overrides, setup_globals
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from stx.engine import batching
from stx.errors import StxError
from stx.runs import hydra_job, interrupts
from stx.runs.composer import ComposingOnce
from stx.runs.job import encoder_identity
from stx.runs.monitor import step_bar

log = logging.getLogger(__name__)


@dataclass
class SweepJob:
    """One job of the sweep: its number, overrides and composed config (``hydra`` node included)."""

    num: int
    overrides: list[str]
    config: DictConfig


def batch_key(config: DictConfig) -> str:
    """What must be equal for jobs to share a batch (see the module's docstring), as text; a config
    that cannot be read here gets a key of its own (its job reports the problem)."""
    try:
        layers = sorted({str(layer) for node in config.loss.values() for layer in (node.get("layers") or {})})
        shape = {
            "encoder": encoder_identity(config.encoder),
            "layers": layers,
            "sizes": [level.size for level in config.schedule.levels],  # not steps: a run done leaves its batch
            "optimizer": config.schedule.optimizer.get("_target_"),
            "bounds": config.schedule.bounds,
            "tile": config.schedule.tile,
            "content": config.images.content,
            "precision": config.precision,
            "device": config.device,
        }
        return repr(shape)
    except Exception:  # noqa: BLE001 — any problem is the job's to report
        return f"job {config.hydra.job.num}"


def assign_devices(configs: Sequence[DictConfig], count: int) -> list[str | None]:
    """The device each job runs on when there are ``count`` CUDA devices: jobs asking for ``auto``
    or ``cuda`` are dealt round-robin to ``cuda:0`` … ``cuda:<count-1>`` (None: the job's own setting
    stands, as it does for all of them on a machine with fewer than two)."""
    if count < 2:
        return [None] * len(configs)
    dealt, assigned = 0, []
    for config in configs:
        if str(config.get("device")) in ("auto", "cuda"):
            assigned.append(f"cuda:{dealt % count}")
            dealt += 1
        else:
            assigned.append(None)
    return assigned


def cuda_devices() -> int:
    return torch.cuda.device_count()


def launch(*, config: DictConfig, hydra_context: HydraContext, task_function: TaskFunction,
           job_overrides: Sequence[Sequence[str]], initial_job_idx: int, batch_size: int) -> list[JobReturn]:
    """Run the sweep's jobs (see the module's docstring); their returns, in job order."""
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise StxError(f"hydra.launcher.batch_size={batch_size!r} is not valid: use a whole number >= 1 (jobs "
                       f"evaluated together per device).")
    if config.hydra.job.chdir:
        raise StxError("hydra.job.chdir=true cannot be honoured by hydra/launcher=stx_batched, whose jobs share "
                       "one process (and one working folder); use hydra/launcher=basic for it.")
    setup_globals()
    configure_log(config.hydra.hydra_logging, config.hydra.verbose)
    Path(str(config.hydra.sweep.dir)).mkdir(parents=True, exist_ok=True)
    log.info(f"Launching {len(job_overrides)} jobs in batches of up to {batch_size} per device")
    jobs = []
    loader = hydra_context.config_loader
    composed = (loader if isinstance(loader, ComposingOnce) else ComposingOnce(loader)).compose(config, job_overrides)
    for index, (overrides, job_config) in enumerate(zip(job_overrides, composed)):
        num = initial_job_idx + index
        log.info(f"\t#{num} : {' '.join(filter_overrides(overrides))}")
        with open_dict(job_config):
            job_config.hydra.job.id = num
            job_config.hydra.job.num = num
            output_dir = Path(str(job_config.hydra.sweep.dir)) / str(job_config.hydra.sweep.subdir)
            job_config.hydra.runtime.output_dir = str(output_dir.resolve())
        jobs.append(SweepJob(num, list(overrides), job_config))
    groups: dict[str, list[SweepJob]] = {}
    for job in jobs:
        groups.setdefault(batch_key(job.config), []).append(job)
    count = cuda_devices()
    for group in groups.values():  # dealt within each group: its jobs run at once, one batch per device
        for job, device in zip(group, assign_devices([job.config for job in group], count)):
            if device is not None:
                with open_dict(job.config):
                    job.config.device = device
    if jobs:
        _job_logging(jobs[0].config)
    progress = _progress(jobs)
    returns: dict[int, JobReturn] = {}
    threads = torch.get_num_threads()
    encoder_thread = batching.cpu_evaluator(threads)
    try:
        for group in groups.values():
            _run_group(group, batch_size, count, threads, encoder_thread, hydra_context, task_function, progress,
                       returns)
    finally:
        encoder_thread.shutdown()
        torch.set_num_threads(threads)
    progress.close()
    return [returns[job.num] for job in jobs]


def _run_group(group: list[SweepJob], batch_size: int, devices: int, threads: int, encoder_thread: Executor,
               hydra_context: HydraContext, task_function: TaskFunction, progress: Any,
               returns: dict[int, JobReturn]) -> None:
    """Run one group's jobs, up to ``batch_size`` per device at once, into ``returns``. When several
    share the batch, their threads use one intra-op thread each and the CPU's encoder passes run
    in ``encoder_thread`` with ``threads`` (see :mod:`stx.engine.batching`)."""
    workers = min(len(group), batch_size * max(1, devices))
    batch = batching.Batch(encoder_thread, size=workers)
    job_threads = 1 if workers > 1 else threads
    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="stx-job",
                            initializer=batching.use_threads, initargs=(job_threads,)) as pool:
        futures = {pool.submit(_run_job, job, hydra_context, task_function, batch, progress): job for job in group}
        try:
            wait(futures)
        except KeyboardInterrupt as interrupt:
            signum = getattr(interrupt, "signum", signal.SIGINT)
            for future in futures:
                future.cancel()  # jobs still queued never start
            batch.stop(lambda: interrupts.Interrupted(signum))
            wait([future for future in futures if not future.cancelled()])
            raise
        for future, job in futures.items():
            returns[job.num] = future.result()


def _progress(jobs: list[SweepJob]) -> Any:
    """One progress bar for every step of the sweep's jobs (each job's monitor advances it)."""
    def steps(config: DictConfig) -> int:
        try:
            return sum(int(level.steps) for level in config.schedule.levels)
        except Exception:  # noqa: BLE001 — the job reports its own config's problems
            return 0

    return step_bar(sum(steps(job.config) for job in jobs), f"stx: {len(jobs)} jobs")


def _job_logging(config: DictConfig) -> None:
    """Hydra's job logging for the sweep without its log file handlers: each job writes its own
    (:func:`_log_file`)."""
    settings = OmegaConf.to_container(config.hydra.job_logging, resolve=False)
    if settings:
        files = {name for name, handler in settings.get("handlers", {}).items()
                 if str(handler.get("class", "")).endswith("FileHandler")}
        for name in files:
            del settings["handlers"][name]
        for logger in [settings.get("root", {}), *settings.get("loggers", {}).values()]:
            if "handlers" in logger:
                logger["handlers"] = [name for name in logger["handlers"] if name not in files]
    configure_log(OmegaConf.create(settings) if settings else None, config.hydra.verbose)


def _log_file(config: DictConfig) -> logging.Handler:
    """The job's ``<job name>.log`` in its run dir, fed by this thread's records only."""
    path = Path(config.hydra.runtime.output_dir) / f"{config.hydra.job.name}.log"
    handler = logging.FileHandler(path)
    simple = OmegaConf.select(config, "hydra.job_logging.formatters.simple.format")
    handler.setFormatter(logging.Formatter(simple or "[%(asctime)s][%(name)s][%(levelname)s] - %(message)s"))
    thread = threading.get_ident()
    handler.addFilter(lambda record: record.thread == thread)
    return handler


def _run_job(job: SweepJob, hydra_context: HydraContext, task_function: TaskFunction, batch: batching.Batch,
             progress: Any) -> JobReturn:
    """One job in this thread, as Hydra's ``run_job`` runs it in a process of its own: run dir,
    ``.hydra/`` files, log file, callbacks, the task function; its return, or its error, in a
    :class:`JobReturn`."""
    hydra_job.shared_progress.set(progress)  # this thread's context only
    config = job.config
    output_dir = Path(config.hydra.runtime.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    task_cfg = copy.deepcopy(config)
    with read_write(task_cfg), open_dict(task_cfg):
        del task_cfg["hydra"]
    hydra_cfg = OmegaConf.masked_copy(config, "hydra")
    result = JobReturn(overrides=job.overrides, cfg=task_cfg, hydra_cfg=hydra_cfg, working_dir=os.getcwd(),
                       task_name=config.hydra.job.name)
    if config.hydra.output_subdir is not None:
        subdir = output_dir / str(config.hydra.output_subdir)
        _save_config(task_cfg, "config.yaml", subdir)
        _save_config(hydra_cfg, "hydra.yaml", subdir)
        _save_config(config.hydra.overrides.task, "overrides.yaml", subdir)
    handler = _log_file(config)
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with hydra_job.running(config), batching.joining(batch):
            hydra_context.callbacks.on_job_start(config=config, task_function=task_function)
            try:
                result.return_value = task_function(task_cfg)
                result.status = JobStatus.COMPLETED
            except Exception as error:
                result.return_value = error
                result.status = JobStatus.FAILED
            hydra_context.callbacks.on_job_end(config=config, job_return=result)
    finally:
        root.removeHandler(handler)
        handler.close()
    return result
