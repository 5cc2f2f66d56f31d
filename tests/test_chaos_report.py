"""scripts/chaos.py reports however it ends, and tests/test_chaos.py says why it failed: without the full chaos run
(12-15 minutes), by a bound that passes at once."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from test_chaos import _cluster_up, failure_report

from cifarbench.store.manifests import read_manifests

SCRIPT = Path(__file__).parents[1] / "scripts" / "chaos.py"


def chaos(workdir: Path, *args: str) -> tuple[dict, subprocess.CompletedProcess]:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), "--runs", "2", *args, "--workdir", str(workdir), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    return json.loads(out.stdout.strip().splitlines()[-1]), out


def test_chaos_reports_when_its_bound_passes_before_it_submits(tmp_path):
    report, out = chaos(tmp_path, "--seconds", "0")
    assert out.returncode == 1
    assert report["deadline_passed"] is True and report["error"] is None
    assert report["runs"] == 2 and report["runs_completed"] == 0 and len(report["runs_missing"]) == 2
    assert report["status_counts"] == {"not submitted": 2}
    assert "the 0 s bound passed; runs missing" in out.stderr


@pytest.mark.slurm
@pytest.mark.extended  # CI keeps the path above; this one trains on the cluster for ~20 s
@pytest.mark.skipif(not _cluster_up(), reason="no local SLURM cluster (bash slurm/cluster.sh up)")
def test_chaos_reports_when_its_bound_passes_while_the_grid_trains(tmp_path):
    # the failure seen on a busy machine: the reference still training at the bound
    report, out = chaos(tmp_path, "--faults", "0", "--seconds", "6")
    assert out.returncode == 1
    assert report["deadline_passed"] is True and report["error"] is None
    assert report["reference_exit"] is None and report["runs_completed"] == 0
    assert sorted(report["runs_missing"]) == sorted(report["metrics_mismatched"]) and len(report["runs_missing"]) == 2
    # the grid's jobs left are cancelled: they would hold the cluster's CPUs for the next test
    arrays = ",".join({e["array_job_id"] for e in read_manifests(tmp_path / "results").values()})
    queued = subprocess.run(["squeue", "-h", "-t", "PENDING,RUNNING", "-j", arrays], capture_output=True, text=True)
    assert queued.stdout.strip() == ""


def test_failure_report_has_the_scripts_words_and_the_end_of_the_newest_job_logs(tmp_path):
    logs = tmp_path / "results" / "logs"
    for i, job in enumerate(["7_0", "7_1", "8_0"]):
        (logs / job).mkdir(parents=True)
        for suffix in ("out", "err"):
            log = logs / job / f"{job}_0_log.{suffix}"
            log.write_text("".join(f"{job} {suffix} line {n}\n" for n in range(50)))
            os.utime(log, (1000 + i, 1000 + i))
        (logs / job / f"{job}_submitted.pkl").write_bytes(b"\0pickle")
    (tmp_path / "reference.log").write_text("epoch 6/6 of the reference\n")
    said = failure_report(tmp_path, code=1, stdout="{}\n", stderr="Traceback: it broke\n", lines=5, logs=4)
    assert "chaos.py exit code: 1" in said and "Traceback: it broke" in said
    assert "epoch 6/6 of the reference" in said
    assert "6 job logs in" in said and "the 4 newest below" in said
    assert "8_0 err line 49" in said and "7_1 out line 45" in said  # the newest, their last 5 lines
    assert "7_1 out line 44" not in said and "7_0 " not in said and "pickle" not in said


def test_failure_report_when_the_script_said_nothing_and_left_no_logs(tmp_path):
    said = failure_report(tmp_path, code=None, stdout="", stderr="")
    assert "chaos.py exit code: None" in said and said.count("(nothing)") == 2 and "0 job logs" in said
