"""scripts/gpu_check.sh and cifarbench.gpu_check: the GPU check writes its four files directly under OUT_DIR, runs
every part, and outlives a part that fails, raises or hangs. The script runs as on the GPU machine: cifarbench
from this tree through PYTHONPATH, started by the ``python3`` on the PATH."""

import ast
import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from cifarbench import gpu_check

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
FILES = {"summary.md", "tables.parquet", "env.json", "log.txt"}
ENV_KEYS = (
    "gpu_name",
    "driver_version",
    "cuda_version",
    "torch_version",
    "torchvision_version",
    "lightning_version",
    "cudnn_version",
    "gpu_memory_free_mib",
    "gpu_memory_total_mib",
    "cpu_count",
    "python_version",
    "hostname",
    "date",
    "git_commit",
)
STATUSES = ("ok", "failed", "timed out", "skipped", "interrupted")


@pytest.fixture
def gpu_machine(tmp_path):
    """Environment variables for the script as the GPU machine runs it: no PYTHONPATH (the script sets it) and a
    ``python3`` first on the PATH, here this interpreter. A wrapper script, not a symlink: a symlinked venv
    interpreter loses the venv's packages."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    python3 = bin_dir / "python3"
    python3.write_text(f'#!/bin/sh\nexec "{sys.executable}" "$@"\n')
    python3.chmod(0o755)
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["PATH"] = f"{bin_dir}{os.pathsep}{env['PATH']}"
    return env


def _script(args, env, cwd, timeout):
    return subprocess.run(
        ["bash", str(SCRIPT), *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=timeout
    )


def _outputs(out: Path) -> tuple[str, list[dict], dict]:
    """Check what the GPU machine can return (one folder, at most 8 plain files, plain names) and read it."""
    entries = list(out.iterdir())
    assert {e.name for e in entries} == FILES and all(e.is_file() for e in entries)
    assert len(entries) <= 8 and all(re.fullmatch(r"[A-Za-z0-9._-]+", e.name) for e in entries)
    assert all(e.stat().st_size <= 16 * 2**20 for e in entries)
    env = json.loads((out / "env.json").read_text())
    assert set(ENV_KEYS) <= set(env)
    assert (out / "log.txt").read_text().strip()
    table = pq.read_table(out / "tables.parquet")
    assert "part" in table.column_names and "table" in table.column_names
    return (out / "summary.md").read_text(), table.to_pylist(), env


def _statuses(summary: str) -> dict[str, str]:
    """part -> status, from the summary's table of parts."""
    found = re.findall(r"^\| (levers|fit|pack|grid) \| \d\. [^|]+ \| ([^|]+) \|", summary, re.M)
    return {part: status.strip() for part, status in found}


def _cheap_pack(monkeypatch):
    """Part pack as a cheap next part: only its first command (the packing benchmark takes minutes on a CPU)."""

    def pack(check, part):
        check.step(part, "bench --help", ["bench", "--help"])

    monkeypatch.setitem(gpu_check.PARTS, "pack", (gpu_check.PARTS["pack"][0], pack))


def _no_probe(monkeypatch):
    # the torch probe costs seconds of importing; these tests are about the parts
    monkeypatch.setattr(gpu_check, "environment", lambda check, smoke: dict.fromkeys(ENV_KEYS))


@pytest.mark.slow
def test_smoke_run_of_the_script_measures_every_part(gpu_machine, tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    # a budget three times the default: on a busy 2-core CPU a part can take several times its idle time
    done = _script([str(out), "--smoke", "--budget", "1440"], gpu_machine, tmp_path, timeout=1800)
    seconds = time.monotonic() - started
    assert done.returncode == 0, done.stderr
    summary, rows, env = _outputs(out)
    assert env["cifarbench_source"] == str(ROOT) and env["smoke"] is True  # this tree, not an installed copy
    assert _statuses(summary) == {"levers": "ok", "fit": "ok", "pack": "ok", "grid": "ok"}, summary
    for title, _ in gpu_check.PARTS.values():
        assert f"## {title}\n\nStatus: **" in summary
    assert "Fusion: measured on a GPU only" in summary and "5 of 5 runs completed" in summary
    assert len(re.findall(r"^- \*\*(met|not met|not measured)\*\*: ", summary, re.M)) == 7
    assert "cifarbench results" in summary  # collect's tables.md

    by_part = {part: [r for r in rows if r["part"] == part and r["table"] != "parts"] for part in gpu_check.PARTS}
    variants = {r["variant"] for r in by_part["levers"]}
    assert {"baseline: PIL DataLoader, eager", "fast path", "device loader", "lightning fit"} <= variants
    assert all(r["images_per_s"] > 0 for r in by_part["levers"])
    assert [r["variant"] for r in by_part["fit"]] == ["fast path", "baseline loader (torchvision)"]
    assert all(r["status"] == "completed" and r["epochs_done"] == 3 for r in by_part["fit"])
    assert [r["status"] for r in by_part["grid"]] == ["completed"] * 5
    assert sorted(r["seed"] for r in by_part["grid"]) == [0, 1, 2, 3, 4]
    assert [r["pack"] for r in by_part["pack"]] == [1, 2] and all(r["images_per_s"] > 0 for r in by_part["pack"])
    assert "- **not met**: 3x the aggregate training images/s with runs packed onto one GPU" in summary  # a CPU
    print(f"smoke run of scripts/gpu_check.sh: {seconds:.0f} s")


def test_script_runs_the_tree_with_python3_and_writes_four_files(gpu_machine, tmp_path):
    out = tmp_path / "out"
    done = _script([str(out), "--smoke", "--only", "pack", "--budget", "0"], gpu_machine, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    summary, rows, env = _outputs(out)
    assert env["cifarbench_source"] == str(ROOT) and env["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert env["torch_version"] and env["cpu_count"] == os.cpu_count()
    assert _statuses(summary) == {"levers": "skipped", "fit": "skipped", "pack": "skipped", "grid": "skipped"}
    assert summary.count("not selected (--only)") >= 3
    assert "- set-up: submitit" in summary and (out / "log.txt").read_text().startswith("set-up: submitit")
    assert [r["part"] for r in rows] == list(gpu_check.PARTS)  # the table of parts alone


def test_script_without_an_out_dir_or_with_an_unwritable_one_exits_2(gpu_machine, tmp_path):
    done = _script([], gpu_machine, tmp_path, timeout=60)
    assert done.returncode == 2 and done.stderr.startswith("usage: ")
    blocker = tmp_path / "file"
    blocker.write_text("")
    done = _script([str(blocker / "out"), "--smoke"], gpu_machine, tmp_path, timeout=120)
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "cannot write to" in done.stderr


def test_a_failing_part_is_logged_and_the_next_part_runs(tmp_path, monkeypatch, capsys):
    _no_probe(monkeypatch)
    _cheap_pack(monkeypatch)
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--smoke", "--only", "levers,pack", "--fail-part", "levers"]) == 0
    summary, rows, _ = _outputs(out)
    statuses = _statuses(summary)
    assert statuses["levers"] == "failed" and statuses["pack"] == "ok"
    assert "data synthetic100: failed (exit 1)" in summary and "forced failure (--fail-part)" in summary
    log = (out / "log.txt").read_text()
    assert log.index("forced failure (--fail-part)") < log.index("usage: cifarbench bench")  # pack ran after
    assert {r["part"]: r["status"] for r in rows}["levers"] == "failed"
    assert "[levers] failed" in capsys.readouterr().out


def test_a_part_that_raises_is_logged_with_its_traceback_and_the_next_part_runs(tmp_path, monkeypatch):
    _no_probe(monkeypatch)
    _cheap_pack(monkeypatch)

    def broken(check, part):
        raise RuntimeError("no such thing\nsecond line")

    monkeypatch.setitem(gpu_check.PARTS, "fit", (gpu_check.PARTS["fit"][0], broken))
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--smoke", "--only", "fit,pack"]) == 0
    summary, _, _ = _outputs(out)
    assert _statuses(summary)["fit"] == "failed" and _statuses(summary)["pack"] == "ok"
    assert "RuntimeError: no such thing" in summary and "second line" not in summary
    assert "Traceback" in (out / "log.txt").read_text()


def test_a_hanging_part_is_killed_at_its_cap_with_its_children(tmp_path, monkeypatch):
    _no_probe(monkeypatch)
    _cheap_pack(monkeypatch)
    pid_file = tmp_path / "child.pid"
    hang = (
        "import subprocess, time; child = subprocess.Popen(['sleep', '300']); "
        f"open({str(pid_file)!r}, 'w').write(str(child.pid)); time.sleep(300)"
    )
    monkeypatch.setattr(gpu_check, "FORCED_FAILURE", hang)
    budgets = {**gpu_check.SMOKE.budgets, "levers": 6}
    monkeypatch.setattr(gpu_check, "SMOKE", dataclasses.replace(gpu_check.SMOKE, budgets=budgets))
    out = tmp_path / "out"
    started = time.monotonic()
    assert gpu_check.main([str(out), "--smoke", "--only", "levers,pack", "--fail-part", "levers"]) == 0
    assert time.monotonic() - started < 60
    summary, _, _ = _outputs(out)
    assert _statuses(summary) == {"levers": "timed out", "fit": "skipped", "pack": "ok", "grid": "skipped"}
    assert "data synthetic100: timed out (killed after 6 s)" in summary
    child = Path(f"/proc/{pid_file.read_text()}/stat")
    for _ in range(50):  # killed with its parent's process group; init reaps it soon after
        if not child.exists() or child.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the hanging command's child outlived the timeout")


def test_a_zero_budget_skips_every_part_with_a_note(tmp_path, monkeypatch):
    _no_probe(monkeypatch)
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--budget", "0"]) == 0
    summary, rows, _ = _outputs(out)
    assert _statuses(summary) == dict.fromkeys(gpu_check.PARTS, "skipped")
    for title, _ in gpu_check.PARTS.values():
        assert f"## {title}\n\nStatus: **skipped**: the total budget of 0 s was used up (0 s left)" in summary
    assert len(re.findall(r"^- \*\*not measured\*\*: ", summary, re.M)) == 7
    assert [(r["part"], r["status"]) for r in rows] == [(p, "skipped") for p in gpu_check.PARTS]


def test_without_submitit_the_grid_part_is_skipped_with_a_note(tmp_path, monkeypatch):
    _no_probe(monkeypatch)
    monkeypatch.setattr(gpu_check, "installed", lambda module: False)
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--smoke", "--only", "grid"]) == 0
    summary, _, _ = _outputs(out)
    assert _statuses(summary)["grid"] == "skipped" and "submitit is not installed" in summary


def test_unknown_part_names_are_one_line_errors(tmp_path, capsys):
    for args in (["--only", "fitt"], ["--fail-part", "x"], ["--budget", "-1"]):
        with pytest.raises(SystemExit) as exc:
            gpu_check.main([str(tmp_path / "out"), *args])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_a_log_over_the_limit_keeps_its_start_and_end(tmp_path):
    log = tmp_path / "log.txt"
    log.write_bytes(b"start\n" + b"x" * 10_000 + b"\nend\n")
    gpu_check.cap_log(log, limit=2_000)
    text = log.read_text()
    assert len(text) <= 2_000 and text.startswith("start\n") and text.endswith("\nend\n") and "left out" in text


def test_the_parity_tolerance_is_test_parity_s():
    # read, not imported: importing it loads torch
    tree = ast.parse((ROOT / "tests" / "test_parity.py").read_text())
    (value,) = [
        ast.literal_eval(node.value)
        for node in tree.body
        if isinstance(node, ast.Assign) and [getattr(t, "id", None) for t in node.targets] == ["TOLERANCE"]
    ]
    assert value == gpu_check.PARITY_TOLERANCE
