"""The step callback of a tracked job: progress bar, metric and image logging, quality metrics
every ``tracking.image_every`` steps, the latest image kept for saving on failure, checkpoints
written to the run dir and the MLflow run, and what the run costs (``perf/…``)."""

from __future__ import annotations

import dataclasses
import resource
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
from tqdm import tqdm

from stx.engine.optim import Checkpoint, OptimizationCallback, StepInfo
from stx.runs import hydra_job, joblog, layout
from stx.errors import WriteError
from stx.runs.tracking import RunTracker



def step_bar(total: int, desc: str, initial: int = 0) -> tqdm:
    """A progress bar of ``total`` steps: redrawn on a terminal, a line every 30 s in logs (batch jobs, CI)."""
    return tqdm(total=total, initial=initial, desc=desc, unit="step", dynamic_ncols=True,
                mininterval=0.1 if sys.stderr.isatty() else 30.0)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak memory of this job: CUDA's allocator peak on a GPU, else the process's peak RSS."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


class JobMonitor(OptimizationCallback):
    """Reports each step of a job of ``steps`` steps (starting after ``first_step``) to
    ``tracker`` and a progress bar, and scores the image with ``evaluate`` (``{metric: value}``,
    logged as ``eval/<metric>``) every ``tracker.image_every`` steps; use as a context manager
    around the optimisation. ``present`` turns the optimised image into the job's result (colour
    control) before it is logged, scored or kept; ``started_at`` (unix time) is when the job's
    process started."""

    def __init__(
        self,
        tracker: RunTracker,
        run_dir: Path,
        steps: int,
        *,
        evaluate: Callable[[torch.Tensor], Mapping[str, float]],
        present: Callable[[torch.Tensor], torch.Tensor] = lambda image: image,
        started_at: float,
        first_step: int = 0,
    ) -> None:
        self.tracker = tracker
        self.run_dir = run_dir
        self.steps = steps
        self.evaluate = evaluate
        self.present = present
        self.started_at = started_at
        self.latest: StepInfo | None = None
        """The latest step reported, its image as optimised (see :meth:`latest_result`)."""
        self.steps_run = 0
        self.pixels = 0
        self.judging_s = 0.0
        self.first_step_at: float | None = None
        self.optimisation_started = time.perf_counter()
        self.shared = hydra_job.shared_progress.get()
        self.progress = self.shared or step_bar(steps, "stx", first_step)

    def __enter__(self) -> JobMonitor:
        self.optimisation_started = time.perf_counter()
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.shared is None:
            self.progress.close()

    def on_start(self) -> None:
        self.first_step_at = time.time()

    def needs_image(self, step: int) -> bool:
        """The steps whose image is logged and scored (every ``tracking.image_every``); the others
        are reported in chunks (:data:`~stx.engine.optim.STEP_CHUNK`), without waiting for the device."""
        every = self.tracker.image_every
        return every > 0 and step % every == 0

    def on_step(self, info: StepInfo) -> None:
        self.steps_run += 1
        self.pixels += info.image.shape[-2] * info.image.shape[-1]
        self.latest = info
        if self.needs_image(info.step):
            info = dataclasses.replace(info, image=self.present(info.image))
        self.tracker.log_step(info)
        if self.needs_image(info.step) and 0 < info.step < self.steps:  # the last: the output's
            self.log_evaluation(info.image, info.step)
        if self.shared is None:
            self.progress.set_postfix(loss=f"{info.values['total']:.4g}", size=info.size, refresh=False)
        self.progress.update()
        if info.step % max(1, self.steps // 10) == 0 or info.step == self.steps:  # ten lines a run in stx.log
            joblog.to_file(f"step {info.step}/{self.steps} ({info.size} px): total {info.values['total']:.6g}")

    def latest_result(self) -> torch.Tensor:
        """The latest step's image as the job's result (``present``): what a stopped job keeps."""
        return self.present(self.latest.image)

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        path = self.run_dir / layout.CHECKPOINT_FILE
        try:
            layout.save_checkpoint(checkpoint, path, self.tracker.run_id)
        except OSError as exc:  # a full or failing disk: the job stops as on a store failure, its image kept
            raise WriteError(f"the checkpoint of step {checkpoint.step} could not be written to {path} "
                                f"({exc.strerror or exc}): the disk is full or failing") from exc
        self.tracker.log_checkpoint(path, checkpoint.step)

    def log_evaluation(self, image: torch.Tensor, step: int) -> dict[str, float]:
        """Score ``image``, log the scores as ``eval/<metric>`` at ``step`` and return them."""
        started = time.perf_counter()
        scores = dict(self.evaluate(image))
        self.judging_s += time.perf_counter() - started
        self.tracker.log_metrics({layout.EVAL_PREFIX + name: value for name, value in scores.items()}, step)
        return scores

    def performance(self, device: torch.device) -> dict[str, float]:
        """What the optimisation cost, as ``perf/<name>``: seconds per step and pixels per second
        (optimisation only, quality metrics excluded), peak memory (bytes), and seconds from the
        process's start to the start of the first step (imports, config, job, store, targets)."""
        seconds = time.perf_counter() - self.optimisation_started - self.judging_s
        perf = {"peak_memory_bytes": float(peak_memory_bytes(device))}
        if self.steps_run and seconds > 0:
            perf.update(seconds_per_step=seconds / self.steps_run, pixels_per_second=self.pixels / seconds)
        if self.first_step_at is not None:
            perf["startup_seconds"] = self.first_step_at - self.started_at
        return {layout.PERF_PREFIX + name: value for name, value in perf.items()}
