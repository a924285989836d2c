"""The job's own log file (``stx.log`` in its run dir, logged with its MLflow run): lines written
there only, not a second time on the terminal, which has them from a print or the progress bar."""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from stx.runs import layout

log = logging.getLogger("stx")


def to_file(message: str, level: int = logging.INFO) -> None:
    """Write ``message`` to the job's log file(s) only (Hydra's file handler on the root logger)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def summary(cfg: DictConfig, tags: dict[str, str]) -> str:
    """The job in a few lines for its log file: name, overrides, config choices, images, size and steps."""
    choices = ", ".join(sorted(f"{group}={choice}" for group, choice in layout.choices(tags).items()))
    return (f"job {tags.get(layout.TAG_RUN_NAME, '')!r}: overrides: {tags.get(layout.TAG_OVERRIDES) or '(none)'}\n"
            f"  choices: {choices}\n  content: {cfg.images.content}\n  styles: {', '.join(cfg.images.styles)}\n"
            f"  size: {cfg.schedule.size} px, steps: {cfg.schedule.steps}, device: {cfg.device}, seed: {cfg.seed}")
