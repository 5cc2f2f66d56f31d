"""``runs/<run_id>/progress.json``: how far a run in training has got, for ``status``; removed when it ends."""

from __future__ import annotations

import json
import os

from cifarbench.store import atomic
from cifarbench.store.layout import Layout


def write_progress(results: str | os.PathLike, run_id: str, *, epochs_done: int, epochs: int) -> None:
    atomic.write_text(Layout(results).progress(run_id), json.dumps({"epochs_done": epochs_done, "epochs": epochs}))


def read_progress(results: str | os.PathLike, run_id: str) -> dict | None:
    """``{"epochs_done": ..., "epochs": ...}`` of a run in training, or None."""
    try:
        return json.loads(Layout(results).progress(run_id).read_text())
    except (OSError, ValueError):
        return None


def clear_progress(results: str | os.PathLike, run_id: str) -> None:
    Layout(results).progress(run_id).unlink(missing_ok=True)
