"""How stx stops on Ctrl-C (SIGINT) and SIGTERM (no torch, no mlflow).

The first signal is passed on to a sweep's worker processes (joblib's), which are given time to
close their runs, and raises :class:`Interrupted`: the job unwinds, writes its latest image and
closes its MLflow run KILLED, and ``stx`` exits with ``128 + signal number`` (130 for Ctrl-C,
143 for SIGTERM). Signals that arrive while stx is already stopping are held off: they print a
note and do not cut the closing of the run short. Ctrl-\\ (SIGQUIT) or ``kill -9`` still end
the process at once, leaving the run open. Once the run is closed and stx exits, they are
ignored.
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from typing import Any

import psutil

STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)
Handlers = dict[int, Any]
"""Signal number → the handler installed before (as :func:`signal.signal` returns it)."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM stopped stx while a job ran; ``signum`` is the signal."""

    def __init__(self, signum: int) -> None:
        super().__init__(f"interrupted by {signal.Signals(signum).name}")
        self.signum = signum


def _install(handler: Callable[[int, Any], None] | signal.Handlers) -> Handlers:
    """Install ``handler`` for the stop signals; only the main thread receives signals, so in
    another (a batched sweep's job) nothing changes: its launcher stops it."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    return {signum: signal.signal(signum, handler) for signum in STOP_SIGNALS}


def _held_off(signum: int, frame: Any) -> None:
    # os.write: a print() here could land inside another write to sys.stderr (reentrant call)
    os.write(2, f"\nstx: {signal.Signals(signum).name} while stopping: still writing the latest image and "
                f"closing the MLflow run (Ctrl-\\ quits at once and leaves the run open)\n".encode())


def hold_off() -> None:
    """From now on, SIGINT and SIGTERM only print a note (stx is already stopping)."""
    _install(_held_off)


def ignore() -> None:
    """Ignore SIGINT and SIGTERM from now on (stx is exiting, its run closed). Unlike a Python
    handler, this lasts through the interpreter's shutdown, which would otherwise reset the
    handlers to the defaults and let one more Ctrl-C kill the process."""
    _install(signal.SIG_IGN)


received: int | None = None
"""The stop signal this process received, if any (a sweep's parent run is KILLED only then)."""


def _interrupt(signum: int, frame: Any) -> None:
    global received, _pending
    received = signum
    hold_off()
    if sweep_workers:
        psutil.wait_procs(forward(signum), timeout=WORKERS_WAIT_S)
    if _uninterruptible:
        _pending = signum  # raised when the block ends (see uninterruptible)
        return
    raise Interrupted(signum)


_uninterruptible = 0
"""How many :func:`uninterruptible` blocks the main thread is in."""
_pending: int | None = None
"""The stop signal received inside them, to raise when they end."""


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
    """A block that a stop signal does not cut short: one that arrives meanwhile is raised as
    :class:`Interrupted` when the block ends (a call to the store's helper process is one block:
    cut between its request and its answer, the answers would fall out of step with the calls)."""
    global _uninterruptible, _pending
    main = threading.current_thread() is threading.main_thread()
    _uninterruptible += main
    try:
        yield
    finally:
        _uninterruptible -= main
        if main and not _uninterruptible and _pending is not None:
            signum, _pending = _pending, None
            raise Interrupted(signum)


sweep_workers = False
"""Whether this process launches a sweep's jobs (set by the sweep's callback): only then is a stop
signal passed on to its child processes (a single job's children, such as data-loading workers,
stop with the job)."""


WORKERS_WAIT_S = 60.0
"""How long a stopped process waits for its workers to close their runs before it unwinds (and
its launcher, e.g. joblib, kills them)."""


helpers: set[int] = set()
"""Processes this one started that are not workers: they ignore stop signals and end with it (the
store's helper process, :mod:`stx.runs.store_process`, which closes the runs)."""


def forward(signum: int) -> list[psutil.Process]:
    """Send ``signum`` to this process's worker processes (a sweep's joblib workers, which a
    ``kill`` of the sweep alone does not reach), so that each writes its latest image and closes
    its run; returns them. Resource trackers and :data:`helpers`, which ignore it and live as long
    as this process, are left out."""
    workers = []
    for process in psutil.Process().children(recursive=True):
        try:
            if process.pid in helpers or "resource_tracker" in " ".join(process.cmdline()):
                continue
            process.send_signal(signum)
            workers.append(process)
        except psutil.Error:
            pass
    return workers


def stop_on_signals() -> Handlers:
    """Make the next SIGINT or SIGTERM raise :class:`Interrupted` and hold off the ones after
    it; returns the previous handlers for :func:`restore`. Call from the main thread."""
    return _install(_interrupt)


def restore(previous: Handlers) -> None:
    for signum, handler in previous.items():
        signal.signal(signum, handler)


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The exit status for an interrupt: 143 for SIGTERM, 130 for Ctrl-C."""
    return 128 + (interrupt.signum if isinstance(interrupt, Interrupted) else signal.SIGINT)
