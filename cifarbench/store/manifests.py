"""Submission manifests: ``submissions/<time>-<pid>.json``, one per submission, mapping each run id to its job.

Each entry holds the run id, the job id (``123_4`` for an array task), the array job id and index, the log files
and the run's spec as a dict (``RunSpec.to_dict``), so that ``status`` can describe a run without the grid. The
manifest also keeps the grid file's text, so that the report shows what was submitted even where the file has
changed or is elsewhere."""

from __future__ import annotations

import json
import os
from datetime import datetime, timezone
from pathlib import Path

from cifarbench.store import atomic
from cifarbench.store.layout import Layout


def write_manifest(results: str | os.PathLike, executor: str, grid: str | None, entries: list[dict]) -> dict:
    """Write a manifest of ``entries`` (nothing when there are none) and return it, with its ``path``."""
    now = datetime.now(timezone.utc)
    manifest: dict = {
        "submitted_at": now.isoformat(),
        "executor": executor,
        "grid": grid,
        "grid_text": _text(grid),
        "results": str(results),
        "runs": entries,
    }
    if entries:
        path = Layout(results).submissions / f"{now.strftime('%Y%m%dT%H%M%S%f')}-{os.getpid()}.json"
        atomic.write_text(path, json.dumps(manifest, separators=(",", ":")))  # no indent: 10x faster
        manifest["path"] = str(path)
    return manifest


def _text(path: str | None) -> str | None:
    try:
        return Path(path).read_text(encoding="utf-8") if path else None
    except (OSError, UnicodeDecodeError):
        return None


def list_manifests(results: str | os.PathLike) -> list[dict]:
    """Every readable manifest of ``results``, oldest first, each with its ``path``."""
    out = []
    for path in sorted(Layout(results).submissions.glob("*.json")):
        try:
            manifest = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(manifest, dict) and isinstance(manifest.get("runs"), list):
            out.append({**manifest, "path": str(path)})
    return out


def read_manifests(results: str | os.PathLike) -> dict[str, dict]:
    """run id -> its latest manifest entry, with the manifest's executor, path and submission time, over every
    submission to ``results``. A damaged manifest is skipped: its runs show as lost or not submitted."""
    latest = {}
    for manifest in list_manifests(results):
        try:
            for entry in manifest["runs"]:
                latest[entry["run_id"]] = {
                    **entry,
                    "executor": manifest["executor"],
                    "manifest": manifest["path"],
                    "submitted_at": manifest["submitted_at"],
                    "results": manifest.get("results"),
                }
        except (KeyError, TypeError):
            continue
    return latest
