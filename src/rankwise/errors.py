"""The one error every bad input becomes: a one-line message naming the flag, the file or
the field and what was expected. The CLI prints it and exits 2 (no traceback)."""

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A user-facing configuration error; the message names the flag or key."""
