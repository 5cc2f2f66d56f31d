"""Errors a user can cause: the CLI prints ``str(e)`` as one line and exits with code 2, no traceback."""


class UsageError(Exception):
    """An error the user caused; the CLI prints str(e) as one line and exits 2."""


class GridError(UsageError):
    """A grid file that cannot be turned into run specs: ``<file>: <where>: <what is wrong and what to do>``."""
