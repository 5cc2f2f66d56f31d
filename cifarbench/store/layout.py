"""Every path of a results folder, in one place.

::

    runs/<run_id>/record.parquet   the run's outcome, one row (completed or failed)
    runs/<run_id>/record.json      what a scan reads of it, written after it and checked against it (a copy)
    runs/<run_id>/last.ckpt        the last epoch's checkpoint (resume)
    runs/<run_id>/progress.json    epochs done while the run trains
    runs/<run_id>/loggers/<name>/  what a grid's `logger:` (tensorboard, csv, wandb, mlflow) writes
    runs/<run_id>/ranks/<job>.<n>/ a multi-device run's attempt: rank 0's decision, each failed rank's error
    locks/<run_id>.lock            held (flock) by the one job that trains the run
    groups/<group_id>/last.ckpt    a fused group's last epoch: every member's state (resume)
    logs/%j/ , logs/local/         submitit's job scripts and logs (SLURM jobs, local jobs)
    logs/probe/%j/                 the jobs of `submit --probe` / `cifarbench probe`
    logs/collect-<job>.out         the log of the job `submit --collect` queues after the runs
    submissions/<time>-<pid>.json  one manifest per submission: run id -> job
    bench/<time>-<host>.parquet    `cifarbench bench` tables
    runs.parquet                   what collect last read: one row per run
    tables.md, summary.csv, plots/ collect's output
    report.html                    collect's output in one self-contained page
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

RECORD = "record.parquet"
RECORD_SUMMARY = "record.json"
CHECKPOINT = "last.ckpt"
PROGRESS = "progress.json"
RUNS = "runs"


@dataclass(frozen=True)
class Layout:
    root: Path

    def __init__(self, root: str | os.PathLike):
        object.__setattr__(self, "root", Path(root))

    def run_dir(self, run_id: str) -> Path:
        return self.root / RUNS / run_id

    def rank_files(self, run_id: str, attempt: str) -> Path:
        """What the ranks of a multi-device run's attempt (``<job>.<restart>``) share: its decision, their errors."""
        return self.run_dir(run_id) / "ranks" / attempt

    def record(self, run_id: str) -> Path:
        return self.run_dir(run_id) / RECORD

    def record_summary(self, run_id: str) -> Path:
        return self.run_dir(run_id) / RECORD_SUMMARY

    def checkpoint(self, run_id: str) -> Path:
        return self.run_dir(run_id) / CHECKPOINT

    def progress(self, run_id: str) -> Path:
        return self.run_dir(run_id) / PROGRESS

    def loggers(self, run_id: str) -> Path:
        return self.run_dir(run_id) / "loggers"

    def group_checkpoint(self, group_id: str) -> Path:
        return self.root / "groups" / group_id / CHECKPOINT

    def lock(self, run_id: str) -> Path:
        # not in the run's folder, which keeps only what the run produced
        return self.root / "locks" / f"{run_id}.lock"

    @property
    def runs(self) -> Path:
        return self.root / RUNS

    @property
    def logs(self) -> Path:
        return self.root / "logs"

    @property
    def slurm_logs(self) -> Path:
        return self.logs / "%j"  # submitit puts each job's files in a folder named after its id

    @property
    def local_logs(self) -> Path:
        return self.logs / "local"

    @property
    def probe_logs(self) -> Path:
        return self.logs / "probe" / "%j"  # `submit --probe`'s jobs, apart from the runs'

    def collect_log(self, job: str) -> Path:
        return self.logs / f"collect-{job}.out"

    def collect_script(self, stamp: str) -> Path:
        """The batch script of a ``submit --collect`` job on SLURM (``stamp``: when and by which process)."""
        return self.logs / f"collect-{stamp}.sh"

    @property
    def submissions(self) -> Path:
        return self.root / "submissions"

    @property
    def bench(self) -> Path:
        return self.root / "bench"

    @property
    def runs_table(self) -> Path:
        return self.root / "runs.parquet"

    @property
    def tables(self) -> Path:
        return self.root / "tables.md"

    @property
    def report(self) -> Path:
        return self.root / "report.html"

    @property
    def summary(self) -> Path:
        return self.root / "summary.csv"

    @property
    def plots(self) -> Path:
        return self.root / "plots"
