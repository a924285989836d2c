"""User-facing errors.

Every mistake a user can make (bad path, bad layer name, bad config value, a loss that
diverges) raises a subclass of :class:`StxError` whose message is one paragraph naming the
bad value and what would be valid. The command line prints that message without a traceback.
"""


class StxError(Exception):
    """A problem the user can fix; the message says how."""


class ConfigError(StxError):
    """A config value is invalid."""


class ImageError(StxError):
    """An image file is missing, unreadable or of an impossible size."""


class WeightsError(StxError):
    """Encoder weights cannot be found or loaded."""


class NonFiniteLossError(StxError):
    """The objective became NaN or infinite during optimisation."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step
