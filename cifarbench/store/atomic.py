"""The one way cifarbench writes a file that others read: a unique temporary file beside it, fsync, rename; and
the check that a results folder can be written at all, before anything is submitted.

Readers see the old file or the new one, never a part of one; two writers of the same path each write their
own temporary file and the last rename wins whole; a writer killed mid-write leaves only a dot-file behind."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from cifarbench.errors import UsageError


@contextlib.contextmanager
def replacing(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path to write ``path``'s new content to; on a clean exit it is synced and renamed over
    ``path``, on an exception removed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        with open(tmp, "rb") as fh:
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600: give it the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with replacing(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text(path: str | os.PathLike, text: str) -> Path:
    return write_bytes(path, text.encode("utf-8"))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_results_writable(results: str | os.PathLike, *, min_free_mb: int = 100, create: bool = True) -> None:
    """Refuse to submit when no record could be written: unwritable folder or (nearly) full disk. Without
    ``create`` (a dry run) nothing is left behind: a folder not made yet is tested in the nearest one that exists,
    which it would be made in."""
    folder = Path(results)
    if folder.exists() and not folder.is_dir():
        raise UsageError(f"results folder {folder} is a file; choose a folder")
    try:
        if create:
            folder.mkdir(parents=True, exist_ok=True)
        # below a file, the nearest "folder" is that file, and the test fails as mkdir would (Not a directory)
        tested = folder if create else next(p for p in (folder, *folder.absolute().parents) if p.exists())
        with tempfile.NamedTemporaryFile(dir=tested, prefix=".write-test-"):
            pass
    except OSError as e:
        raise UsageError(
            f"results folder {folder} is not writable ({e.strerror}); fix its permissions or "
            "choose another with `results:`"
        ) from None
    free_mb = shutil.disk_usage(tested).free // 2**20
    if free_mb < min_free_mb:
        raise UsageError(f"results folder {folder} has only {free_mb} MB free; records and checkpoints need more")
