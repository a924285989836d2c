"""The step callback of a tracked job: progress bar, metric and image logging, the latest image
kept for saving on failure, and checkpoints written to the run dir and the MLflow run."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from stx import layout
from stx.optim import Checkpoint, OptimizationCallback, StepInfo
from stx.tracking import RunTracker


class JobMonitor(OptimizationCallback):
    """Reports each step of a job of ``steps`` steps (starting after ``first_step``) to
    ``tracker`` and a progress bar; use as a context manager around the optimisation."""

    def __init__(self, tracker: RunTracker, run_dir: Path, steps: int, first_step: int = 0) -> None:
        self.tracker = tracker
        self.run_dir = run_dir
        self.latest: StepInfo | None = None
        # a redrawn bar on a terminal; a line every 30 s in logs (batch jobs, CI)
        interval = 0.1 if sys.stderr.isatty() else 30.0
        self.progress = tqdm(total=steps, initial=first_step, desc="stx", unit="step", dynamic_ncols=True,
                             mininterval=interval)

    def __enter__(self) -> JobMonitor:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.close()

    def on_step(self, info: StepInfo) -> None:
        self.latest = info
        self.tracker.log_step(info)
        self.progress.set_postfix(loss=f"{info.values['total']:.4g}", size=info.size, refresh=False)
        self.progress.update()

    def on_checkpoint(self, checkpoint: Checkpoint) -> None:
        path = layout.save_checkpoint(checkpoint, self.run_dir / layout.CHECKPOINT_FILE)
        self.tracker.log_checkpoint(path, checkpoint.step)
