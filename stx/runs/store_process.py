"""A helper process that talks to the MLflow store for this process's jobs (:func:`stx.runs.store.serve`).

MLflow takes 1–2 s to import, as long as torch. ``stx`` starts the helper (:func:`prestart`) for a
job or a sweep before it imports torch; the helper imports MLflow on another core while the job is
built, and each job's :class:`~stx.runs.tracking.RunTracker` (and a sweep's parent run) then sends it
each call (:class:`RemoteStore`): in a batched sweep, the store's work then runs beside the jobs'
instead of taking turns with it for the interpreter. The helper ends when this process does, however
it ends (its stdin closes).
"""

from __future__ import annotations

import pickle
import signal
import subprocess
import sys
import threading
from typing import Any

from stx.errors import StoreFailure
from stx.runs import interrupts, startup

_process: StoreProcess | None = None


class StoreProcess:
    """``python -m stx.runs.store_process``, answering one call at a time (calls from several threads take turns)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen([sys.executable, "-m", "stx.runs.store_process"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE)
        interrupts.helpers.add(self.process.pid)
        self.lock = threading.Lock()
        self.unanswered = 0
        """Requests sent ahead (:meth:`open_ahead`) whose answers are still to be read and dropped."""

    def open_ahead(self, uri: str) -> None:
        """Have the helper open the store at ``uri`` now, without waiting: a new store's creation
        (seconds) then overlaps the job's build. A failure is raised by the next call on it."""
        with self.lock, interrupts.uninterruptible():
            try:
                pickle.dump((uri, "ready", (), {}), self.process.stdin)
                self.process.stdin.flush()
            except OSError:
                return  # the next call reports the helper's end
            self.unanswered += 1

    def call(self, uri: str, method: str, *args: Any, **kwargs: Any) -> Any:
        """``JobStore(uri).call(method, *args, **kwargs)`` in the helper; what it raises is raised here."""
        with self.lock, interrupts.uninterruptible():
            try:
                pickle.dump((uri, method, args, kwargs), self.process.stdin)
                self.process.stdin.flush()
                for _ in range(self.unanswered):
                    pickle.load(self.process.stdout)
                self.unanswered = 0
                status, value = pickle.load(self.process.stdout)
            except (OSError, EOFError, pickle.UnpicklingError) as exc:
                raise StoreFailure(f"stx's store process (pid {self.process.pid}) ended "
                                   f"(exit status {self.process.poll()}): {type(exc).__name__}") from None
        if status == "raise":
            raise value
        return value


class RemoteStore:
    """A :class:`~stx.runs.store.JobStore` for ``uri`` in the helper process: the same ``call``."""

    def __init__(self, process: StoreProcess, uri: str) -> None:
        self.process, self.uri = process, uri

    def call(self, method: str, *args: Any, **kwargs: Any) -> Any:
        return self.process.call(self.uri, method, *args, **kwargs)


def prestart() -> None:
    """Start this process's helper now, if it has none (MLflow then loads while the job is built)."""
    global _process
    if _process is None:
        _process = StoreProcess()


def started() -> StoreProcess | None:
    """The helper :func:`prestart` started, if any."""
    return _process


FINISH_TIMEOUT_S = 60.0
"""How long :func:`stop` waits for a request sent ahead (a new store's creation and migration) to end."""


def stop() -> None:
    """End the helper at exit. Every call has been answered, but a request sent ahead may still be creating
    or migrating a new store (a config error can stop the job a second after it asked): killed there, the
    store would be left half-migrated and unusable, so the helper is then let finish it (its stdin closed,
    it returns once the request is done) before it is killed; it ignores SIGTERM, so SIGKILL."""
    if _process is None or _process.process.poll() is not None:
        return
    if _process.unanswered:
        try:
            _process.process.stdin.close()
            _process.process.wait(timeout=FINISH_TIMEOUT_S)
        except (OSError, subprocess.TimeoutExpired):
            pass
    if _process.process.poll() is None:
        _process.process.kill()


if __name__ == "__main__":  # the helper itself: MLflow loads, then it serves until stdin closes
    # Ctrl-C and SIGTERM are the job's to handle, from the start: a Ctrl-C while MLflow loads printed a traceback
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, signal.SIG_IGN)
    startup.command_process()
    with startup.heavy_imports():
        from stx.runs.store import serve
    serve()
