"""Errors a user can cause, and the checks that produce them; the CLI prints them as one line and exits 2. Also
the wording every layer's messages share (``did_you_mean``, ``plural``)."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class UsageError(Exception):
    """An error the user caused; the CLI prints str(e) as one line and exits 2."""


class Problems(UsageError):
    """Several errors at once (each one line), found before anything was done."""

    def __init__(self, lines: list[str]):
        super().__init__("\n".join(lines))
        self.lines = lines


class GridError(UsageError):
    """A grid file that cannot be turned into run specs: ``<file>: <where>: <what is wrong and what to do>``."""


class UnknownNameError(UsageError, ValueError):
    """A name that is not in a registry; the message lists the valid names."""


def did_you_mean(name: object, valid: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest valid name, or an empty string when none is close."""
    close = difflib.get_close_matches(str(name), list(valid), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def plural(count: int, noun: str) -> str:
    """``count`` and ``noun`` as a message says them: "1 run", "2 runs", "0 runs"."""
    return f"{count} {noun}{'s' * (count != 1)}"


def check_name(name: str, valid: Iterable[str], what: str) -> str:
    """Return ``name`` if it is one of ``valid``, else raise UnknownNameError with a did-you-mean."""
    valid = list(valid)
    if name in valid:
        return name
    raise UnknownNameError(f"unknown {what} {name!r}{did_you_mean(name, valid)}; valid: {', '.join(valid)}")


def check_int(value: object, what: str, lo: int, hi: int | None = None, why: str = "") -> int:
    """Return ``value`` if it is an integer (not a bool) in [lo, hi], else raise ValueError naming ``what``."""
    if isinstance(value, bool) or not isinstance(value, int):
        if hi is None:
            raise ValueError(f"{what}: must be an integer >= {lo}{why}, got {value!r}")
        raise ValueError(f"{what}: must be an integer, got {value!r}")
    if hi is None and not value >= lo:
        raise ValueError(f"{what}: must be an integer >= {lo}{why}, got {value!r}")
    if not lo <= value <= (hi if hi is not None else value):
        raise ValueError(f"{what}: must be between {lo} and {hi}{why}, got {value!r}")
    return value
