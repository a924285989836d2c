"""A batched sweep's job configs, each composed once (:class:`ComposingOnce`); Hydra and OmegaConf
only, so that a sweep's bad override is refused before torch loads."""

from __future__ import annotations

import copy
from collections.abc import Sequence
from typing import Any

from hydra._internal.config_loader_impl import get_overrides_dirname
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override, OverrideType
from omegaconf import DictConfig, OmegaConf, open_dict
from omegaconf.errors import OmegaConfBaseException


class ComposingOnce:
    """Hydra's config loader for a batched sweep: each job's config is composed once, the sweeper's
    check of a batch (Hydra composes every job to refuse a bad one before any runs) and the launch
    sharing it, and a job that differs from the sweep's first only in the values of plain keys
    (``key=value``, no config group, no ``+``/``~``, a scalar value) is a copy of the first with those
    values set, at a thirtieth of a composition's cost; any other is composed in full. Everything else
    is the wrapped loader's."""

    def __init__(self, loader: Any) -> None:
        self.loader = loader
        self._first: tuple[DictConfig, list[Override]] | None = None
        self._composed: dict[tuple[str, ...], DictConfig] = {}
        self._parser = OverridesParser.create()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loader, name)

    def load_sweep_config(self, master_config: DictConfig, sweep_overrides: list[str]) -> DictConfig:
        """The job's config, as Hydra's ``load_sweep_config`` composes it (each config is handed out
        once: the launch takes the one its sweeper's check composed)."""
        key = tuple(sweep_overrides)
        if key in self._composed:
            return self._composed.pop(key)
        parsed = self._parser.parse_overrides(list(sweep_overrides))
        job = _from_first(*self._first, parsed) if self._first is not None else None
        if job is None:
            job = self.loader.load_sweep_config(master_config, list(sweep_overrides))
            if self._first is None:
                self._first = copy.deepcopy(job), parsed
        self._composed[key] = job
        return job

    def compose(self, master_config: DictConfig, job_overrides: Sequence[Sequence[str]]) -> list[DictConfig]:
        """Every job's config, in order, taken once from what was composed."""
        configs = []
        for overrides in job_overrides:
            configs.append(self.load_sweep_config(master_config, list(overrides)))
            self._composed.pop(tuple(overrides), None)
        return configs


def _from_first(first: DictConfig, first_overrides: list[Override], overrides: list[Override]) -> DictConfig | None:
    """``first`` with the plain values in which ``overrides`` differ from ``first_overrides`` set, or
    None when they differ in anything else (see :class:`ComposingOnce`)."""
    def plain(override: Override) -> bool:
        return (override.type == OverrideType.CHANGE and override.package is None and not override.is_hydra_override()
                and "/" not in override.key_or_group and override.key_or_group not in first.hydra.runtime.choices
                and isinstance(override.value(), (str, int, float, bool, type(None))))

    if len(overrides) != len(first_overrides):
        return None
    changed = [new for old, new in zip(first_overrides, overrides) if old.input_line != new.input_line]
    if not all(plain(old) and plain(new) and old.key_or_group == new.key_or_group
               for old, new in zip(first_overrides, overrides) if old.input_line != new.input_line):
        return None
    job = copy.deepcopy(first)
    try:
        for override in changed:
            OmegaConf.update(job, override.key_or_group, override.value(), merge=True)
    except OmegaConfBaseException:
        return None  # a full composition reports it
    task = [override for override in overrides if not override.is_hydra_override()]
    dirname = job.hydra.job.config.override_dirname
    with open_dict(job.hydra):
        job.hydra.overrides.task = [override.input_line for override in task]
        job.hydra.job.override_dirname = get_overrides_dirname(
            overrides=task, kv_sep=dirname.kv_sep, item_sep=dirname.item_sep, exclude_keys=dirname.exclude_keys)
    return job
