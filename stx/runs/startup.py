"""A process's start-up: loading torch, MLflow and stx's modules without Python's cyclic garbage collector.

Importing them creates some 300 000 objects that live as long as the process and leave almost
no garbage (about 1 MB), yet every import that adds a quarter more to them triggers a full
collection that walks them all: 8 collections, 1.3 s of a sweep's start on the 2-core machine
(0.9 s of it in collections of the old generation). Inside :func:`heavy_imports` the collector is
off; at its end, if the block loaded modules, the objects that exist are frozen (``gc.freeze``:
later collections skip them, and the little garbage among them is kept), and the collector is on
again.

Only the processes ``stx`` runs as a command do this (:func:`command_process`): stx used as a
library leaves the collector of its host program alone.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading
from collections.abc import Iterator

_lock = threading.Lock()
_command = False
_depth = 0
_was_enabled = True
_modules = 0


def command_process() -> None:
    """This process is ``stx`` (or its store's helper process): :func:`heavy_imports` takes effect."""
    global _command
    _command = True


@contextlib.contextmanager
def heavy_imports() -> Iterator[None]:
    """The block's imports run without the cyclic collector (see the module's docstring); safe to
    nest and to enter from several threads (the collector is on again when the last block ends)."""
    global _depth, _was_enabled, _modules
    if not _command:
        yield
        return
    with _lock:
        if not _depth:
            _was_enabled, _modules = gc.isenabled(), len(sys.modules)
            gc.disable()
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if not _depth:
                if len(sys.modules) > _modules:  # else nothing was loaded: the objects made since stay collectable
                    gc.freeze()
                if _was_enabled:
                    gc.enable()
