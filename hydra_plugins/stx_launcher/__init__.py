"""Hydra's entry point for stx's batched launcher (Hydra takes launchers from ``hydra_plugins`` only);
the launcher itself is :mod:`stx.runs.launcher`, its config ``conf/hydra/launcher/stx_batched.yaml``."""

from __future__ import annotations

from collections.abc import Sequence

from hydra.core.utils import JobReturn
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig


class BatchedLauncher(Launcher):
    """``hydra/launcher=stx_batched``: see :mod:`stx.runs.launcher`."""

    def __init__(self, batch_size: int = 16) -> None:
        self.batch_size = batch_size
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig) -> None:
        from stx.runs.composer import ComposingOnce

        self.config, self.hydra_context, self.task_function = config, hydra_context, task_function
        # The sweeper holds this same context: its check of each batch then composes the jobs the launch runs.
        hydra_context.config_loader = ComposingOnce(hydra_context.config_loader)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        from stx.runs.startup import heavy_imports

        with heavy_imports():
            from stx.runs import launcher

        assert self.config is not None and self.hydra_context is not None and self.task_function is not None
        return launcher.launch(config=self.config, hydra_context=self.hydra_context, task_function=self.task_function,
                               job_overrides=job_overrides, initial_job_idx=initial_job_idx,
                               batch_size=self.batch_size)
