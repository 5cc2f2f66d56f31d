"""The run lock where the filesystem has no flock: lease files, held by one process at a time across processes
(and nodes), broken once their holder died; tested with real processes."""

import errno
import fcntl
import os
import signal
import subprocess
import sys
import time

import pytest

from cifarbench.cli import main
from cifarbench.store import locks
from cifarbench.store.layout import Layout

# a holder in a process of its own: takes the run's lock, says so, then holds it for argv[3] seconds
HOLDER = """
import sys, time
from cifarbench.cli import main
from cifarbench.store import locks
locks.HEARTBEAT_S, locks.STALE_S, locks.POLL_S = 0.2, 1.5, 0.05
with locks.run_lock(sys.argv[1], sys.argv[2], on_wait=lambda: print("waiting", flush=True)):
    print("held", time.time(), flush=True)
    time.sleep(float(sys.argv[3]))
print("released", time.time(), flush=True)
"""


def _holder(results, seconds: float) -> subprocess.Popen:
    env = {**os.environ, locks.FORCE_ENV: "lease"}
    proc = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(results), "run-a", str(seconds)], stdout=subprocess.PIPE, text=True, env=env
    )
    return proc


def _line(proc: subprocess.Popen) -> str:
    line = proc.stdout.readline()
    assert line, f"the holder printed nothing more (exit {proc.poll()})"
    return line.strip()


def _held_at(proc: subprocess.Popen) -> float:
    """When the holder took the lock, after waiting for it or not (a slow start may find it free already)."""
    line = _line(proc)
    if line == "waiting":
        line = _line(proc)
    assert line.startswith("held"), line
    return float(line.split()[1])


def test_two_processes_hold_a_lease_one_after_the_other(tmp_path):
    first = _holder(tmp_path, 2.0)
    assert _line(first).startswith("held")
    second = _holder(tmp_path, 0.0)
    held_at = _held_at(second)
    released_at = float(_line(first).split()[1])
    assert held_at >= released_at, f"the second held it at {held_at}, before the first released it at {released_at}"
    assert first.wait(30) == 0 and second.wait(30) == 0
    lease = Layout(tmp_path).lock("run-a").with_suffix(".lease")
    assert not lease.exists() and not list(lease.parent.glob("*.stale-*"))  # released, nothing left behind


def test_a_killed_holders_lease_is_broken_once_stale(tmp_path):
    first = _holder(tmp_path, 600.0)
    assert _line(first).startswith("held")
    first.send_signal(signal.SIGKILL)  # no release, no renewal: the lease stays, and grows stale
    first.wait(30)
    killed_at = time.time()
    second = _holder(tmp_path, 0.0)
    held_at = _held_at(second)
    print(f"held {held_at - killed_at:.2f} s after the kill (stale after 1.5 s)")
    # the lease was renewed at most a heartbeat (0.2 s) before the kill: not broken while fresh
    assert held_at - killed_at >= 1.5 - 0.2 - 0.1
    assert second.wait(30) == 0
    assert not list(Layout(tmp_path).lock("run-a").parent.glob("*.stale-*"))


def test_a_live_holder_keeps_its_lease_past_the_stale_age(tmp_path):
    first = _holder(tmp_path, 4.0)  # renewed every 0.2 s for 4 s: more than twice the stale age
    assert _line(first).startswith("held")
    second = _holder(tmp_path, 0.0)
    held_at = _held_at(second)
    released_at = float(_line(first).split()[1])
    assert held_at >= released_at, f"the second broke a live lease: held at {held_at}, released at {released_at}"
    assert first.wait(30) == 0 and second.wait(30) == 0


def test_a_filesystem_without_flock_is_found_and_uses_leases(tmp_path, monkeypatch):
    assert locks.flock_works(tmp_path)
    real = fcntl.flock

    def no_flock(fh, op):  # Lustre mounted without flock
        if op & fcntl.LOCK_UN:
            return real(fh, op)
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    assert not locks.flock_works(tmp_path)
    lease = Layout(tmp_path).lock("run-b").with_suffix(".lease")
    with locks.run_lock(tmp_path, "run-b"):
        assert lease.exists() and lease.read_text().split()[1] == str(os.getpid())
    assert not lease.exists()


def test_another_flock_error_is_not_mistaken_for_a_missing_flock(tmp_path, monkeypatch):
    def broken(fh, op):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(fcntl, "flock", broken)
    with pytest.raises(OSError, match="Input/output error"), locks.run_lock(tmp_path, "run-c"):
        pass


def test_submit_says_when_the_results_folder_has_no_flock(tmp_path, synthetic_root, capsys, monkeypatch):
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"models: [resnet20]\ndatasets: [synthetic10]\nopts: [step-160]\nepochs: 1\nbatch_sizes: [64]\n"
        f"seeds: [0]\nroot: {synthetic_root}\nverify: false\nresults: {tmp_path / 'results'}\n"
        "slurm: {gpus_per_node: 0, cpus_per_task: 1}\n"
    )
    assert main(["submit", str(grid), "--dry-run", "--executor", "local"]) == 0
    assert "flock" not in capsys.readouterr().err
    real = fcntl.flock
    monkeypatch.setattr(fcntl, "flock", lambda fh, op: real(fh, op) if op & fcntl.LOCK_UN else _enosys())
    assert main(["submit", str(grid), "--dry-run", "--executor", "local"]) == 0
    err = capsys.readouterr().err
    assert f"note: {tmp_path / 'results'} is on a filesystem without flock: each run locks itself with a lease" in err


def _enosys():
    raise OSError(errno.ENOSYS, "Function not implemented")
