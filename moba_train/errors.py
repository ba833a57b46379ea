"""Errors caused by user input: launchers print them as one line and exit 2, never as a traceback."""

import sys
from contextlib import contextmanager


class UserError(Exception):
    """Bad input the user can fix (config, data, checkpoint, hardware request)."""


class CheckpointError(UserError):
    """A missing, unreadable, corrupt or incompatible checkpoint; the message names the file."""


class ConfigError(UserError):
    """An invalid config value; the message names the key and the allowed values."""


class TrainingError(UserError):
    """A run that cannot go on for a reason the user can act on (e.g. a diverged loss)."""


@contextmanager
def one_line_errors():
    """Inside a launcher's Hydra main (Hydra itself reports what escapes it with a traceback): a UserError is one
    `error:` line and exit 2; Ctrl-C where no checkpoint is due (setup, or a second signal that stops at once) one
    line and the shell's 130."""
    try:
        yield
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted (SIGINT): stopped without saving", file=sys.stderr)
        sys.exit(130)
