"""Errors caused by user input: launchers print them as one line and exit 2, never as a traceback."""


class UserError(Exception):
    """Bad input the user can fix (config, data, checkpoint, hardware request)."""


class CheckpointError(UserError):
    """A missing, unreadable, corrupt or incompatible checkpoint; the message names the file."""


class ConfigError(UserError):
    """An invalid config value; the message names the key and the allowed values."""


class TrainingError(UserError):
    """A run that cannot go on for a reason the user can act on (e.g. a diverged loss)."""
