"""Errors a user can cause: the CLI prints them as one line and exits with code 2."""

import difflib


class UsageError(Exception):
    """An error the user caused; the CLI prints str(e) as one line and exits 2."""


class GridError(UsageError):
    """A grid file that cannot be turned into run specs: ``<file>: <where>: <what is wrong and what to do>``."""


class UnknownNameError(UsageError, ValueError):
    """A name that is not in a registry; the message lists the valid names."""


def check_name(name: str, valid, what: str) -> str:
    """Return ``name`` if it is one of ``valid``, else raise UnknownNameError with a did-you-mean."""
    valid = list(valid)
    if name in valid:
        return name
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    raise UnknownNameError(f"unknown {what} {name!r}{hint}; valid: {', '.join(valid)}")
