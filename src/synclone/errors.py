"""The one exception type that reaches the user as a single line.

Library code raises :class:`UserError` for anything the user can fix (a missing folder, an unknown
config key, a label-space mismatch). The CLI prints its message on one line and exits with code 2;
every other exception is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input the user can fix. The message says what is wrong and how to fix it."""

    exit_code = 2


class MissingResource(UserError):
    """Something a valid config needs is not on this machine (weights, a dataset folder, a checkpoint).

    ``synclone run --dry-run`` lists these apart from mistakes in the recipe itself.
    """
