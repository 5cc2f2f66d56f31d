"""Faults on the real local SLURM cluster: requeues, cancels, SIGKILLs and a concurrent resubmission.

Runs scripts/chaos.py (24 deterministic CPU runs, 12 faults) and checks its report: nothing lost, nothing
duplicated or torn, every run's final metrics equal the same run trained without interruption. Its time bound
scales with a one-epoch calibration, at most MAX_SECONDS; when a test fails, what the script said and the end of its
job logs are in the test's captured output."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cifarbench.store.layout import Layout

pytestmark = [pytest.mark.slurm, pytest.mark.slow]
MAX_SECONDS = 3600  # the most chaos.py's calibrated bound may be: an hour, where it passes in 12-15 minutes


def _cluster_up() -> bool:
    if not shutil.which("scontrol"):
        return False
    out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return out.returncode == 0 and "UP" in out.stdout


def _text(out: str | bytes | None) -> str:
    return out.decode(errors="replace") if isinstance(out, bytes) else out or ""


def _tail(path: Path, lines: int) -> str:
    text = path.read_text(errors="replace").splitlines()
    return "\n".join(text[-lines:])


def failure_report(workdir: Path, *, code: int | None, stdout: str, stderr: str, lines: int = 20, logs: int = 6) -> str:
    """What to read when a chaos run failed: its exit code (None: killed at the test's timeout), its stdout's end,
    its stderr, and the last ``lines`` lines of its reference's and calibration's logs and of the ``logs`` newest job
    logs of its results folder."""
    said = stdout.strip().splitlines()
    parts = [
        f"chaos.py exit code: {code}",
        "its stdout ends:\n" + ("\n".join(said[-3:]) or "(nothing)"),
        "its stderr:\n" + (stderr.strip() or "(nothing)"),
    ]
    found = [p for p in (workdir / "reference.log", workdir / "calibration.log") if p.is_file()]
    job_logs = Layout(workdir / "results").logs
    every = sorted(
        (p for p in job_logs.rglob("*") if p.suffix in (".out", ".err") and p.is_file()),
        key=lambda p: p.stat().st_mtime,
        reverse=True,
    )
    parts.append(f"{len(every)} job logs in {job_logs}" + (f", the {logs} newest below" if len(every) > logs else ""))
    for path in found + every[:logs]:
        parts.append(f"--- {path.relative_to(workdir)}, last {lines} lines:\n{_tail(path, lines)}")
    return "\n".join(parts)


def _chaos(tmp_path, *args: str) -> tuple[dict, int | None]:
    script = Path(__file__).parents[1] / "scripts" / "chaos.py"
    command = [sys.executable, str(script), *args, "--max-seconds", str(MAX_SECONDS), "--workdir", str(tmp_path)]
    timeout = MAX_SECONDS + 180  # the bound, then the report and the clean-up
    try:
        out = subprocess.run([*command, "--json"], capture_output=True, text=True, timeout=timeout)
        code, stdout, stderr = out.returncode, out.stdout, out.stderr
    except subprocess.TimeoutExpired as e:
        code, stdout, stderr = None, _text(e.stdout), _text(e.stderr)
    # pytest shows it where the test fails
    print(failure_report(tmp_path, code=code, stdout=stdout, stderr=stderr))
    said = stdout.strip().splitlines()
    try:
        report = json.loads(said[-1])
    except (IndexError, json.JSONDecodeError):
        pytest.fail("chaos.py printed no report; what it said and its logs are in the captured stdout below")
    print(json.dumps(report, indent=1))
    return report, code


@pytest.mark.skipif(not _cluster_up(), reason="no local SLURM cluster (bash slurm/cluster.sh up)")
def test_chaos_loses_nothing(tmp_path):
    report, code = _chaos(tmp_path, "--runs", "24", "--faults", "12")
    assert report["runs"] == 24
    assert not report["deadline_passed"] and report["error"] is None
    assert sum(report["faults_injected"].values()) >= 9 and all(report["faults_injected"].values())
    assert report["concurrent_submission_exit"] == 0
    assert report["records"] == 24 and report["records_unreadable"] == 0
    assert report["records_lost"] == 0 and report["duplicates"] == 0
    assert report["metrics_mismatched"] == []
    assert report["status_counts"] == {"completed": 24}
    assert report["runs_resumed_from_checkpoint"] >= 1
    assert code == 0


@pytest.mark.extended
@pytest.mark.skipif(not _cluster_up(), reason="no local SLURM cluster (bash slurm/cluster.sh up)")
def test_chaos_loses_nothing_of_a_packed_grid(tmp_path):
    # two runs to a task, a CPU each: the cluster's two CPUs train one task at a time
    report, code = _chaos(tmp_path, "--runs", "8", "--faults", "4", "--pack", "2")
    assert report["runs"] == 8
    assert not report["deadline_passed"] and report["error"] is None
    assert sum(report["faults_injected"].values()) >= 3
    assert report["records"] == 8 and report["records_unreadable"] == 0
    assert report["records_lost"] == 0 and report["duplicates"] == 0
    assert report["metrics_mismatched"] == []
    assert report["status_counts"] == {"completed": 8}
    assert code == 0
