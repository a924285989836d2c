"""User-facing errors.

Every mistake a user can make (bad path, bad layer name, bad config value, a loss that
diverges) raises a subclass of :class:`StxError` whose message is one paragraph naming the
bad value and what would be valid. The command line prints that message without a traceback.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for quoting
    a library's error inside one paragraph."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


class StxError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(StxError):
    """A config value is invalid."""


class ImageError(StxError):
    """An image file is missing, unreadable or of an impossible size."""


class TooManyPixelsError(ImageError):
    """An image file's header declares more pixels than stx reads (``stx.engine.image.MAX_PIXELS``)."""


class TrackingError(StxError):
    """The tracking store cannot be reached or used."""


class WriteError(TrackingError):
    """A file of the run could not be written (a full or failing disk); the store itself still works."""


class StoreFailure(Exception):
    """A call to the MLflow store failed; the message is the store's (or the OS's) error. Not a
    user's mistake in itself: the job turns it into a :class:`TrackingError` saying what it was doing."""


class WeightsError(StxError):
    """Encoder weights cannot be found or loaded."""


class NonFiniteLossError(StxError):
    """The objective became NaN or infinite at ``step``; ``image`` is the last image whose loss
    was finite (``1×3×H×W``, [0, 1])."""

    def __init__(self, message: str, step: int, image: torch.Tensor) -> None:
        super().__init__(message)
        self.step = step
        self.image = image
