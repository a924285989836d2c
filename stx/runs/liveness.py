"""Whether the process behind a RUNNING MLflow run is still alive, and closing runs whose process is gone.

Each stx run records the host (``stx.host``), process id (``stx.pid``) and the process's start
time (``stx.pid_start``, unix time in s from psutil, which tells a reused pid apart; runs of older
stx hold clock ticks after boot there, also understood), and refreshes ``stx.heartbeat`` (unix time, s) at every metric flush. A
RUNNING run is dead when, on the same host, its process no longer exists (or the pid now
belongs to a process started at another time); on another host, when its heartbeat is older
than :data:`DEAD_AFTER_S`. A sweep's parent run has host and pid but no heartbeat, so it is
judged only on its own host. Runs without these tags (made by older stx) are never judged.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from datetime import datetime, timezone
from typing import TYPE_CHECKING

import psutil

from stx.runs import layout

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

log = logging.getLogger(__name__)

DEAD_AFTER_S = 600.0
"""A run on another host is dead when its heartbeat is older than this (s). Heartbeats come at
every flush (every few seconds while steps complete), so this allows single steps of 10 min."""


START_TOLERANCE_S = 0.02
"""Start times closer than this are the same process's (both are whole clock ticks after boot)."""


def process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (unix time, s, two decimals), or None where there is no
    such process or it cannot be read."""
    try:
        return f"{psutil.Process(pid).create_time():.2f}"
    except (psutil.Error, OSError):
        return None


def _seconds(start: str) -> float | None:
    """A ``stx.pid_start`` tag as unix time: as written, or from the clock ticks after boot that
    older stx wrote (on Linux); None when it is neither."""
    try:
        if "." in start:
            return float(start)
        return int(start) / os.sysconf("SC_CLK_TCK") + psutil.boot_time()
    except (ValueError, OSError, AttributeError):
        return None


def process_tags() -> dict[str, str]:
    """This process's identity (with its SLURM job, inside one) and a first heartbeat, as run tags."""
    tags = {layout.TAG_HOST: socket.gethostname(), layout.TAG_PID: str(os.getpid()), **heartbeat()}
    start = process_start(os.getpid())
    if start is not None:
        tags[layout.TAG_PID_START] = start
    array, task = os.environ.get("SLURM_ARRAY_JOB_ID"), os.environ.get("SLURM_ARRAY_TASK_ID")
    job = f"{array}_{task}" if array and task else os.environ.get("SLURM_JOB_ID")
    if job:
        tags[layout.TAG_SLURM_JOB] = job
    return tags


def heartbeat() -> dict[str, str]:
    return {layout.TAG_HEARTBEAT: str(int(time.time()))}


def _process_gone(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` no longer exists, or is another process now (its start time is not
    ``start``, the run's tag)."""
    if not psutil.pid_exists(pid):
        return True
    current, recorded = process_start(pid), None if start is None else _seconds(start)
    return current is not None and recorded is not None and abs(float(current) - recorded) > START_TOLERANCE_S


def _last_beat(run: Run) -> float | None:
    """Unix time (s) of the run's last heartbeat (its start if it has none), or None for a tag
    that is not a time stx could have written (edited by hand)."""
    started = run.info.start_time / 1000
    try:
        beat = float(run.data.tags.get(layout.TAG_HEARTBEAT, started))
    except ValueError:
        return None
    return beat if 0 <= beat <= time.time() + DEAD_AFTER_S else None  # NaN, -1e300, 1e300: not a time


def _pid(tags: dict[str, str]) -> int | None:
    """The run's process id, or None for a tag that is not one (edited by hand)."""
    try:
        pid = int(tags[layout.TAG_PID])
    except ValueError:
        return None
    return pid if 0 < pid < 2**31 else None


def dead_reason(run: Run) -> str | None:
    """Why RUNNING ``run``'s process is known to be gone, or None (alive, finished, or unknown)."""
    tags = run.data.tags
    if run.info.status != "RUNNING" or layout.TAG_HOST not in tags or layout.TAG_PID not in tags:
        return None
    host, pid = tags[layout.TAG_HOST], _pid(tags)
    if pid is None:
        return None  # unknown: a run is never closed on the word of a tag stx did not write
    if host == socket.gethostname():
        if _process_gone(pid, tags.get(layout.TAG_PID_START)):
            return f"its process (pid {pid} on {host}) is gone"
        return None
    beat = _last_beat(run)
    silent = None if beat is None else time.time() - beat
    if layout.TAG_HEARTBEAT in tags and silent is not None and silent > DEAD_AFTER_S:
        return f"its process (pid {pid} on {host}) sent no heartbeat for {silent:.0f} s (limit {DEAD_AFTER_S:.0f} s)"
    return None


def close_dead_runs(client: MlflowClient, experiment_id: str) -> list[str]:
    """Close the experiment's RUNNING runs whose process is gone as FAILED, with ``stx.error``
    saying so and the last heartbeat as end time; return their ids."""
    closed = []
    for run in client.search_runs([experiment_id], "attributes.status = 'RUNNING'", max_results=50000):
        reason = dead_reason(run)
        if reason is None:
            continue
        beat = _last_beat(run) or run.info.start_time / 1000  # a local run's tag may be unreadable
        last = datetime.fromtimestamp(beat, timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        client.set_tag(run.info.run_id, layout.TAG_ERROR,
                       f"{reason}: the job ended without closing its run (killed by SIGKILL or the out-of-memory "
                       f"killer, power loss, or its tracking store failed) after its last heartbeat at {last}; "
                       f"closed as FAILED by stx (pid {os.getpid()} on {socket.gethostname()}).")
        client.set_terminated(run.info.run_id, "FAILED", end_time=int(beat * 1000))
        closed.append(run.info.run_id)
    if closed:
        log.warning("closed %d run(s) whose process is gone as FAILED: %s", len(closed), ", ".join(closed))
    return closed
