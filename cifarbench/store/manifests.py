"""Submission manifests: ``submissions/<time>-<pid>.json``, one per submission, mapping each run id to its job.

Each entry holds the run id, the job id (``123_4`` for an array task), the array job id and index, the log files
and the run's spec as a dict (``RunSpec.to_dict``), so that ``status`` can describe a run without the grid."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone

from cifarbench.store import atomic
from cifarbench.store.layout import Layout


def write_manifest(results: str | os.PathLike, executor: str, grid: str | None, entries: list[dict]) -> dict:
    """Write a manifest of ``entries`` (nothing when there are none) and return it, with its ``path``."""
    now = datetime.now(timezone.utc)
    manifest: dict = {
        "submitted_at": now.isoformat(),
        "executor": executor,
        "grid": grid,
        "results": str(results),
        "runs": entries,
    }
    if entries:
        path = Layout(results).submissions / f"{now.strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}.json"
        atomic.write_text(path, json.dumps(manifest, separators=(",", ":")))  # no indent: 10x faster
        manifest["path"] = str(path)
    return manifest


def read_manifests(results: str | os.PathLike) -> dict[str, dict]:
    """run id -> its latest manifest entry, with the manifest's executor, path and submission time, over every
    submission to ``results``. A damaged manifest is skipped: its runs show as lost or not submitted."""
    latest = {}
    for path in sorted(Layout(results).submissions.glob("*.json")):
        try:
            manifest = json.loads(path.read_text())
            for entry in manifest["runs"]:
                latest[entry["run_id"]] = {
                    **entry,
                    "executor": manifest["executor"],
                    "manifest": str(path),
                    "submitted_at": manifest["submitted_at"],
                }
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return latest
