"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class ClipjobError(Exception):
    """A problem the user can fix: bad config value, unreachable URL, corrupt checkpoint, ..."""


class ConfigError(ClipjobError):
    """A config key is unknown or its value is invalid; the message names the key."""
