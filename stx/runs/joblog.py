"""The job's own log file (``stx.log`` in its run dir, logged with its MLflow run): lines written
there only, not a second time on the terminal, which has them from a print or the progress bar."""

from __future__ import annotations

import logging

log = logging.getLogger("stx")


def to_file(message: str, level: int = logging.INFO) -> None:
    """Write ``message`` to the job's log file(s) only (Hydra's file handler on the root logger)."""
    record = log.makeRecord(log.name, level, __file__, 0, message, None, None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
