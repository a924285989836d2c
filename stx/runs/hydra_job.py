"""The Hydra config (``hydra:`` node and all) of the job running in this thread, and where its lines go.

Hydra keeps one config per process (``HydraConfig``); stx's batched launcher (:mod:`stx.runs.launcher`)
runs several jobs at once in threads of one process, so stx reads it through :func:`config`, which
returns the job's own when the launcher set one (:func:`running`), else Hydra's. Those jobs share
one progress bar (:data:`shared_progress`), above which :func:`say` prints their lines.
"""

from __future__ import annotations

import contextlib
import contextvars
import sys
from collections.abc import Iterator
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

_job: contextvars.ContextVar[DictConfig | None] = contextvars.ContextVar("stx_hydra_job", default=None)
shared_progress: contextvars.ContextVar[Any] = contextvars.ContextVar("stx_progress", default=None)
"""A progress bar (tqdm) that the jobs running at once advance together instead of drawing one each."""


def say(line: str, error: bool = False) -> None:
    """Print ``line`` on stdout (stderr with ``error``) in one write (the batched launcher's jobs print
    from threads), above the shared progress bar when one is redrawn on a terminal (in a log, the bar
    is a line every 30 s, and clearing it would put control characters before every line)."""
    file = sys.stderr if error else sys.stdout
    bar = shared_progress.get()
    if bar is None or not sys.stderr.isatty():
        print(line + "\n", end="", file=file, flush=True)
    else:
        bar.write(line, file=file)


def config() -> DictConfig:
    """The ``hydra`` node of this thread's job (``hydra.runtime.output_dir``, ``hydra.job.num``, …)."""
    job = _job.get()
    return job.hydra if job is not None else HydraConfig.get()


@contextlib.contextmanager
def running(job: DictConfig) -> Iterator[None]:
    """Within the block, :func:`config` is ``job.hydra`` in this thread."""
    token = _job.set(job)
    try:
        yield
    finally:
        _job.reset(token)
