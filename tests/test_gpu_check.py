"""scripts/gpu_check.sh and scripts/gpu_check.py: the GPU check writes its four files directly under OUT_DIR, runs
every part, outlives a part that fails, raises or hangs, and keeps the rows of a part cut off half-way. The script
runs as on the GPU machine: cifarbench from this tree through PYTHONPATH, started by the ``python3`` on the PATH.
The check's Python is a script, not part of the package: these tests load it by its path."""

import ast
import dataclasses
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu_check.sh"


def _load_check():
    spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while it is executed
    spec.loader.exec_module(module)
    return module


gpu_check = _load_check()
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
    found = re.findall(rf"^\| ({'|'.join(gpu_check.PARTS)}) \| \d\. [^|]+ \| ([^|]+) \|", summary, re.M)
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
    assert _statuses(summary) == dict.fromkeys(gpu_check.PARTS, "ok"), summary
    for title, _ in gpu_check.PARTS.values():
        assert f"## {title}\n\nStatus: **" in summary
    assert "5 of 5 runs completed" in summary and "cifarbench results" in summary  # collect's tables.md
    verdicts = re.findall(r"^- \*\*(met|not met|not measured)\*\*: (.*)$", summary, re.M)
    assert len(verdicts) == 9
    # at smoke size every goal is measured but the compiled run's (torch.compile is left out)
    assert [goal for verdict, goal in verdicts if verdict == "not measured"] == [
        f"a run compiled with reduce-overhead (CUDA graphs) completes without falling back to eager: "
        f"{gpu_check.NO_COMPILE_IN_SMOKE}"
    ]

    by_part = {part: [r for r in rows if r["part"] == part and r["table"] != "parts"] for part in gpu_check.PARTS}
    speed = {r["variant"]: r for r in by_part["speed"]}
    assert {"baseline: PIL DataLoader, eager", "fast path", "lightning fit"} <= set(speed)
    assert all(r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"] for r in speed.values() if
               r["images_per_s_min"] is not None)  # fmt: skip
    # like with like: the fused group, the packed runs and the unfused run of the same model, data, precision, K
    fuse = by_part["fuse"]
    assert {(r["what"], r["variant"]) for r in fuse} == {
        ("fuse", "1 run, unfused (K runs in sequence: the same)"),
        ("fuse", "fused group of 2"),
        ("pack", "1 run at once"),
        ("pack", "2 runs at once"),
    }
    assert (
        len({(r["model"], r["dataset"], r["precision"], r["batch_size"], r["steps"], r["repeats"]) for r in fuse}) == 1
    )
    assert "the best alternative (" in summary
    fits = [(r["variant"], r["seed"]) for r in by_part["fit"]]
    assert fits == [("fast path", 0), ("baseline loader (torchvision)", 0)]
    assert all(r["status"] == "completed" and r["epochs_done"] == 5 for r in by_part["fit"])
    assert "Indicative only: the tolerance is tests/test_parity.py's" in summary
    assert {"device loader", "fast path, channels_last off"} <= {r["variant"] for r in by_part["levers"]}
    pack = by_part["pack"]
    assert [(r["what"], r["pack"]) for r in pack] == [("pack", 1), ("pack", 2), ("isolation", 2)]
    assert (
        pack[-1]["failed_runs"] == 1 and pack[-1]["images_per_s"] > 0 and "1 of 1 others completed" in pack[-1]["note"]
    )
    assert "- **met**: a packed run that runs out of memory fails alone" in summary
    assert "stand-in for out of memory on a CPU" in summary
    assert "- **not met**: 3x the aggregate training images/s with the most runs packed" in summary  # a CPU
    ddp = by_part["ddp"]
    assert [(r["what"], r["processes"]) for r in ddp] == [("ddp", 1), ("ddp", 2)]
    assert ddp[1]["efficiency"] == pytest.approx(ddp[1]["images_per_s"] / (2 * ddp[0]["images_per_s"]))
    assert [r["status"] for r in by_part["grid"]] == ["completed"] * 5
    assert sorted(r["seed"] for r in by_part["grid"]) == [0, 1, 2, 3, 4]
    print(f"smoke run of scripts/gpu_check.sh: {seconds:.0f} s")


def test_script_runs_the_tree_with_python3_and_writes_four_files(gpu_machine, tmp_path):
    out = tmp_path / "out"
    done = _script([str(out), "--smoke", "--only", "pack", "--budget", "0"], gpu_machine, tmp_path, timeout=300)
    assert done.returncode == 0, done.stderr
    summary, rows, env = _outputs(out)
    assert env["cifarbench_source"] == str(ROOT) and env["python_version"] == ".".join(map(str, sys.version_info[:3]))
    assert env["torch_version"] and env["cpu_count"] == os.cpu_count()
    assert _statuses(summary) == dict.fromkeys(gpu_check.PARTS, "skipped")
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
    assert _statuses(summary) == {**dict.fromkeys(gpu_check.PARTS, "skipped"), "levers": "timed out", "pack": "ok"}
    assert "data synthetic100: timed out (killed after 6 s)" in summary
    child = Path(f"/proc/{pid_file.read_text()}/stat")
    for _ in range(50):  # killed with its parent's process group; init reaps it soon after
        if not child.exists() or child.read_text().split(")")[-1].split()[0] == "Z":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the hanging command's child outlived the timeout")


def test_a_part_killed_half_way_keeps_its_rows_in_both_files(tmp_path, monkeypatch):
    # --kill-part kills the part's benchmark as its cap would, right after it wrote its first row (the baseline)
    _no_probe(monkeypatch)
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--smoke", "--only", "speed", "--kill-part", "speed"]) == 0
    summary, rows, _ = _outputs(out)
    assert _statuses(summary)["speed"] == "timed out"
    assert (
        "bench train: timed out (killed after its first row (--kill-part); kept the 1 rows it had measured)" in summary
    )
    (kept,) = [r for r in rows if r["part"] == "speed" and r["table"] == "bench"]
    assert kept["variant"] == "baseline: PIL DataLoader, eager" and kept["images_per_s"] > 0
    assert re.search(
        r"^\| bench train \| train \| baseline: PIL DataLoader, eager \| 32-true \| [\d,]+ \|", summary, re.M
    )
    # the fast path, measured after the baseline, was never reached: nothing made up in its place
    assert "fast path" not in {r.get("variant") for r in rows} and "fast path |" not in summary


def test_a_check_stopped_during_a_part_keeps_the_rows_the_part_had_measured(tmp_path, monkeypatch):
    # killed from outside (SIGTERM: the GPU machine's window closing) after the part's first benchmark, before the
    # part wrote its tables: summary.md and tables.parquet still hold that benchmark's rows
    _no_probe(monkeypatch)

    def stopped(check, part):
        assert check.dataset(part, "synthetic10", 64, 64)
        args = ["--what", "pipeline", "--dataset", "synthetic10", "--steps", "1", "--warmup", "1", "--repeats", "1"]
        check.bench(part, "bench pipeline", [*args, "--data-root", str(check.data)])
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setitem(gpu_check.PARTS, "speed", (gpu_check.PARTS["speed"][0], stopped))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exc:
        gpu_check.main([str(out), "--smoke", "--only", "speed"])
    assert exc.value.code == 128 + signal.SIGTERM
    summary = (out / "summary.md").read_text()
    rows = pq.read_table(out / "tables.parquet").to_pylist()
    assert _statuses(summary)["speed"] == "interrupted"
    measured = [r for r in rows if r["part"] == "speed" and r["table"] == "bench"]
    assert [r["variant"] for r in measured][-1] == "device loader" and all(r["images_per_s"] > 0 for r in measured)
    assert "Measured before the check was stopped:" in summary
    assert re.search(r"^\| bench pipeline \| device loader \| +\| +\| [\d,]+ \|", summary, re.M), summary


def test_the_caps_leave_the_reserve_of_the_default_budget_unspent():
    assert gpu_check.RESERVE_S >= 60
    for size in (gpu_check.GPU, gpu_check.SMOKE):
        assert set(size.budgets) == set(gpu_check.PARTS)
        assert sum(size.budgets.values()) <= gpu_check.DEFAULT_BUDGET_S - gpu_check.RESERVE_S


def test_the_parts_put_the_figures_that_matter_most_first():
    assert list(gpu_check.PARTS)[:2] == ["speed", "fuse"]
    assert gpu_check.GPU.model == "resnet56" and gpu_check.BATCH_SIZE == 64 and gpu_check.GPU.fuse_k == 8
    # the accuracy check on a GPU: 2 seeds of each loader, seed by seed, at least 5 epochs, then the compiled run
    assert gpu_check.GPU.seeds == 2 and gpu_check.PARITY_EPOCHS >= 5 and gpu_check.GPU.train_size == 50_000
    assert [(label, seed) for label, _, _, seed in gpu_check.fit_runs(gpu_check.GPU.seeds)] == [
        ("fast path", 0),
        ("baseline loader (torchvision)", 0),
        ("fast path", 1),
        ("baseline loader (torchvision)", 1),
        (gpu_check.COMPILED, 0),
    ]


def _bench_row(what, variant, median, low, high, **fields):
    row = {"what": what, "variant": variant, "images_per_s": median, "images_per_s_min": low, "images_per_s_max": high}
    return row | {"baseline": False, "device": "H100", "model": "resnet56"} | fields


def _verdicts(**rows):
    parts = {name: gpu_check.Part(name, title, 60) for name, (title, _) in gpu_check.PARTS.items()}
    for name, part_rows in rows.items():
        parts[name].rows = part_rows
    return {goal.split(":")[0]: (verdict, detail) for goal, verdict, detail in
            gpu_check.verdicts(parts, {"gpu_name": "NVIDIA H100", "smoke": False})}  # fmt: skip


def test_fusion_is_judged_against_the_best_alternative_by_medians_and_spreads():
    sequence = _bench_row("fuse", "1 run, unfused (K runs in sequence: the same)", 1000, 900, 1100, baseline=True)
    fused = _bench_row("fuse", "fused group of 8", 7000, 5000, 7400, ratio=7.0)
    packed = _bench_row("pack", "8 runs at once", 4000, 3000, 4600, pack=8)
    lucky = _bench_row("pack", "8 runs at once", 4000, 3000, 9000, pack=8)  # one noisy window, far above
    found = {}
    for alternative in (packed, lucky):
        found[alternative["images_per_s_max"]] = _verdicts(fuse=[sequence, fused, alternative])
    goal = "a fused group of 8 beats both alternatives, 8 runs packed and 8 runs one after another, beyond the spread "
    goal += "of the windows"
    verdict, detail = found[4600][goal]
    # 7,000 / 4,000 (packed: the faster median, not the one run alone's 1,000); 5,000 / 4,600 window against window
    assert verdict == "met" and detail.startswith("K = 8: 1.75x the best alternative (8 runs packed; 1.09x")
    assert "8 runs in sequence 1,000 (900-1,100)" in detail
    assert found[9000][goal][0] == "not met"  # the spread of the alternative's windows overlaps the group's
    verdict, detail = found[4600]["a fused group of 8 >= 6x one unfused run's training images/s (resnet56)"]
    assert verdict == "met" and "7.00x" in detail and "(windows 5,000-7,400)" in detail


def test_packing_is_judged_at_the_largest_pack_not_the_best_one():
    alone = _bench_row("pack", "1 run at once", 1000, 900, 1100, pack=1, ratio=1.0, slowdown=1.0, baseline=True)
    four = _bench_row("pack", "4 runs at once", 3500, 3400, 3600, pack=4, ratio=3.5, slowdown=1.1)
    eight = _bench_row("pack", "8 runs at once", 2900, 2800, 3000, pack=8, ratio=2.9, slowdown=2.8)
    verdict, detail = _verdicts(pack=[alone, four, eight])[
        "3x the aggregate training images/s with the most runs packed onto one GPU (resnet20)"
    ]
    assert verdict == "not met" and detail.startswith("2.90x with 8 runs at once")


def test_the_out_of_memory_run_must_fail_alone():
    note = "run 0: OutOfMemoryError with a batch of 1: boom; failed: run 0; 7 of 7 others completed; ..."
    variant = "8 runs at once, run 0 out of memory"
    isolated = _bench_row("isolation", variant, 2000, 1900, 2100, failed_runs=1, note=note)
    goal = "a packed run that runs out of memory fails alone"
    assert _verdicts(pack=[isolated])[goal][0] == "met"
    note = "run 0: did not fail: the huge batch fitted in memory; failed: none; 7 of 7 others completed"
    fitted = {**isolated, "failed_runs": 0, "note": note}
    assert _verdicts(pack=[fitted])[goal][0] == "not met"
    note = "run 0: not out of memory but RuntimeError with a batch of 1: cuDNN; failed: run 0; 7 of 7 others completed"
    refused = {**isolated, "note": note}
    assert refused["failed_runs"] == 1 and _verdicts(pack=[refused])[goal][0] == "not met"
    assert _verdicts(pack=[])[goal][0] == "not measured"


def test_a_zero_budget_skips_every_part_with_a_note(tmp_path, monkeypatch):
    _no_probe(monkeypatch)
    out = tmp_path / "out"
    assert gpu_check.main([str(out), "--budget", "0"]) == 0
    summary, rows, _ = _outputs(out)
    assert _statuses(summary) == dict.fromkeys(gpu_check.PARTS, "skipped")
    for title, _ in gpu_check.PARTS.values():
        assert f"## {title}\n\nStatus: **skipped**: the total budget of 0 s was used up (0 s left)" in summary
    assert len(re.findall(r"^- \*\*not measured\*\*: ", summary, re.M)) == 9
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


def test_commands_at_once_run_side_by_side_and_each_keeps_its_output(tmp_path, monkeypatch):
    # the first command hangs (--fail-part's forced failure, made to sleep), the second exits at once: it ends
    # while the first still runs, the first is killed at the part's deadline, the third is skipped
    monkeypatch.setattr(gpu_check, "FORCED_FAILURE", "import time; print('hanging', flush=True); time.sleep(300)")
    work = tmp_path / "work"
    work.mkdir()
    with open(tmp_path / "log.txt", "a", encoding="utf-8") as log:
        check = gpu_check.Check(log=log, work=work, size=gpu_check.SMOKE, budget=60, fail_part="fit")
        part = gpu_check.Part("fit", "fit", 60)
        part.deadline = time.monotonic() + 8
        started = time.monotonic()
        hung, quick, skipped = check.at_once(
            part, [("hang", ["run"], None), ("quick", ["nosuchcommand"], None), ("later", ["run"], "not here")]
        )
        took = time.monotonic() - started
    assert (hung.status, quick.status, skipped.status) == ("timed out", "failed", "skipped"), (hung, quick)
    assert 8 <= took < 20 and quick.seconds < hung.seconds, (took, quick.seconds, hung.seconds)
    assert "hanging" in hung.output and "invalid choice: 'nosuchcommand'" in quick.output
    assert part.steps == [hung, quick, skipped]
    text = (tmp_path / "log.txt").read_text()
    assert text.index("invalid choice") < text.index("[fit] hang: timed out") and "hanging" in text
