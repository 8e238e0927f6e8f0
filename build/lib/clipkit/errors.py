"""Errors that name a user's mistake in one line, raised before any worker starts."""


class ClipkitConfigError(ValueError):
    """A config value or input path is wrong; the message names the key and the fix."""
