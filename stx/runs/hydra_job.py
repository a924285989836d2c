"""The Hydra config (``hydra:`` node and all) of the job running in this thread.

Hydra keeps one per process (``HydraConfig``); stx's batched launcher (:mod:`stx.runs.launcher`) runs
several jobs at once in threads of one process, so stx reads it through :func:`config`, which
returns the job's own when the launcher set one (:func:`running`), else Hydra's.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

_job: contextvars.ContextVar[DictConfig | None] = contextvars.ContextVar("stx_hydra_job", default=None)


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
