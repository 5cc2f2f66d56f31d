"""Faults on the real local SLURM cluster: requeues, cancels, SIGKILLs and a concurrent resubmission.

Runs scripts/chaos.py (24 deterministic CPU runs, 12 faults) and checks its report: nothing lost, nothing
duplicated or torn, every run's final metrics equal the same run trained without interruption."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _cluster_up() -> bool:
    if not shutil.which("scontrol"):
        return False
    out = subprocess.run(["scontrol", "ping"], capture_output=True, text=True)
    return out.returncode == 0 and "UP" in out.stdout


def _chaos(tmp_path, *args: str, seconds: int = 840) -> tuple[dict, int]:
    script = Path(__file__).parents[1] / "scripts" / "chaos.py"
    out = subprocess.run(
        [sys.executable, str(script), *args, "--seconds", str(seconds), "--workdir", str(tmp_path), "--json"],
        capture_output=True,
        text=True,
        timeout=seconds + 60,
    )
    report = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(report, indent=1))
    return report, out.returncode


@pytest.mark.skipif(not _cluster_up(), reason="no local SLURM cluster (bash slurm/cluster.sh up)")
def test_chaos_loses_nothing(tmp_path):
    report, code = _chaos(tmp_path, "--runs", "24", "--faults", "12")
    assert report["runs"] == 24
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
    report, code = _chaos(tmp_path, "--runs", "8", "--faults", "4", "--pack", "2", seconds=1200)
    assert report["runs"] == 8
    assert sum(report["faults_injected"].values()) >= 3
    assert report["records"] == 8 and report["records_unreadable"] == 0
    assert report["records_lost"] == 0 and report["duplicates"] == 0
    assert report["metrics_mismatched"] == []
    assert report["status_counts"] == {"completed": 8}
    assert code == 0
