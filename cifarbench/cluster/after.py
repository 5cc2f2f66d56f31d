"""``submit --collect``: one small job that runs ``cifarbench collect`` (tables.md, report.html, ...) once every job
of a submission has ended, so that nobody has to poll.

On SLURM it is a one-CPU batch job with ``--dependency=afterany:<arrays>``: it starts when every array task has
ended, however it ended. Locally it is a detached process that waits for the submission's local jobs (process
ids) and then runs the same command. Run as ``python -m cifarbench.cluster.after PID... -- COMMAND...``, it is
that waiting process.
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

from cifarbench.cluster import queue
from cifarbench.errors import UsageError
from cifarbench.store.layout import Layout

TIME = "00:15:00"  # collect reads footers: 10,000 records take seconds, their plots a minute or two
POLL_S = 2.0


def collect_command(results: str | os.PathLike, grid: str | None) -> list[str]:
    """The command the job runs: this interpreter's cifarbench, on absolute paths (the job starts elsewhere)."""
    command = [sys.executable, "-m", "cifarbench", "collect", str(Path(results).resolve())]
    return command + (["--grid", str(Path(grid).resolve())] if grid else [])


def script_text(command: list[str], setup: list[str] | tuple[str, ...] = ()) -> str:
    """Pure: the collect job's batch script: the grid's setup lines (``module load ...``), then the command."""
    return "\n".join(["#!/bin/bash", *setup, "exec " + shlex.join(command), ""])


def sbatch_command(jobs: list[str], script: str | os.PathLike, *, log: str | os.PathLike, resources: dict) -> list[str]:
    """Pure: the sbatch call of the collect job, after ``jobs`` (array job ids), in the grid's partition, account
    and QOS, running ``script`` (``script_text``, written under the results folder's logs: ``squeue -o %o`` then
    names it, as it names the arrays' scripts)."""
    args = [
        "sbatch",
        "--parsable",
        "--job-name=cifarbench-collect",
        f"--dependency=afterany:{':'.join(jobs)}",
        "--nodes=1",
        "--ntasks=1",
        "--cpus-per-task=1",
        f"--time={TIME}",
        f"--output={log}",
    ]
    args += [f"--{key}={resources[key]}" for key in ("partition", "account", "qos") if resources.get(key)]
    return [*args, str(script)]


def queue_collect(manifest: dict, *, grid: str | None) -> dict:
    """Queue the collect job after the manifest's jobs; returns ``{"job_id": ..., "log": ..., "after": [...]}``."""
    results = manifest["results"]
    layout = Layout(results)
    layout.logs.mkdir(parents=True, exist_ok=True)
    command = collect_command(results, grid)
    jobs = sorted({str(e["array_job_id"]) for e in manifest["runs"]}, key=lambda j: (len(j), j))
    if manifest["executor"] == "slurm":
        resources = manifest["runs"][0].get("resources") or {}
        log = layout.collect_log("%j")
        script = layout.collect_script(f"{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        script.write_text(script_text(command, resources.get("setup", ())))
        done = subprocess.run(
            sbatch_command(jobs, script, log=log, resources=resources), capture_output=True, text=True, timeout=60
        )
        if done.returncode != 0:
            said = " ".join(done.stderr.split()) or f"exit code {done.returncode}"
            raise UsageError(
                f"the runs are queued, but sbatch refused the collect job ({said}); run `{shlex.join(command[2:])}` "
                "once they have ended"
            )
        job = done.stdout.strip().split(";")[0]  # --parsable: "id" or "id;cluster"
        return {"job_id": job, "log": str(log).replace("%j", job), "after": jobs}
    log = layout.collect_log(f"local-{datetime.now(timezone.utc).strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
    with open(log, "ab") as out:
        waiter = subprocess.Popen(
            [sys.executable, "-m", "cifarbench.cluster.after", *jobs, "--", *command],
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # outlives the submitting shell, as the local jobs do
        )
    return {"job_id": str(waiter.pid), "log": str(log), "after": jobs}


def wait_then_run(pids: list[str], command: list[str]) -> None:
    """Wait until none of the local jobs ``pids`` is alive, then become ``command``."""
    while any(queue.local_alive(pid) for pid in pids):
        time.sleep(POLL_S)
    print(f"every job ({', '.join(pids)}) has ended: {shlex.join(command)}", flush=True)
    os.execv(command[0], command)


if __name__ == "__main__":
    split = sys.argv.index("--")
    wait_then_run(sys.argv[1:split], sys.argv[split + 1 :])
