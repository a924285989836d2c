"""``python -m stx …`` is the ``stx`` command."""

from stx.cli import run

run()
