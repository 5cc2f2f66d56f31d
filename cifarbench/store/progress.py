"""``runs/<run_id>/progress.json``: how far a run in training has got, for ``status``; removed when it ends.

It holds the epochs done and to do and, since status estimates when runs end, each epoch's seconds, the latest
test accuracy and when it was written (``updated_at``, seconds since the epoch)."""

from __future__ import annotations

import json
import os
import time

from cifarbench.store import atomic
from cifarbench.store.layout import Layout


def write_progress(
    results: str | os.PathLike,
    run_id: str,
    *,
    epochs_done: int,
    epochs: int,
    epoch_seconds: list[float] | None = None,
    test_acc: float | None = None,
) -> None:
    progress = {
        "epochs_done": epochs_done,
        "epochs": epochs,
        "epoch_seconds": [round(s, 3) for s in epoch_seconds or ()],
        "test_acc": test_acc,
        "updated_at": time.time(),
    }
    atomic.write_text(Layout(results).progress(run_id), json.dumps(progress))


def read_progress(results: str | os.PathLike, run_id: str) -> dict | None:
    """``{"epochs_done": ..., "epochs": ...}`` of a run in training (and, where written, ``epoch_seconds``,
    ``test_acc``, ``updated_at``), or None."""
    try:
        progress = json.loads(Layout(results).progress(run_id).read_text())
    except (OSError, ValueError):
        return None
    return progress if isinstance(progress, dict) else None


def clear_progress(results: str | os.PathLike, run_id: str) -> None:
    Layout(results).progress(run_id).unlink(missing_ok=True)
