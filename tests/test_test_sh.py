"""scripts/test.sh, the README's test command, run on a copy with its setup and python replaced by stubs: what it
passes to pytest and what it says when the browser tests will be skipped."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
SKIPPED = "the browser tests of report.html are skipped; install it with: apt-get install chromium"


def run_test_sh(tmp_path, *args: str, on_path: tuple[str, ...] = ()) -> tuple[list[str], str]:
    """Runs a copy of test.sh with a PATH of only bash, dirname and the stub programs ``on_path``; returns the
    arguments its python got and its stderr."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "test.sh", tmp_path / "scripts")
    (tmp_path / "scripts" / "setup.sh").write_text("true\n")
    got = tmp_path / "args"
    stubs = {tmp_path / ".venv" / "bin" / "python": f'printf "%s\\n" "$@" > {got}\n'}
    stubs.update({tmp_path / "bin" / name: "true\n" for name in on_path})
    for stub, body in stubs.items():
        stub.parent.mkdir(parents=True, exist_ok=True)
        stub.write_text("#!/bin/sh\n" + body)
        stub.chmod(0o755)
    (tmp_path / "bin").mkdir(exist_ok=True)
    for tool in ("bash", "dirname"):
        os.symlink(shutil.which(tool), tmp_path / "bin" / tool)
    out = subprocess.run(
        [shutil.which("bash"), str(tmp_path / "scripts" / "test.sh"), *args],
        capture_output=True,
        text=True,
        env={"PATH": str(tmp_path / "bin")},
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    return got.read_text().splitlines(), out.stderr


def test_test_sh_lists_the_slowest_tests_and_passes_its_arguments_after(tmp_path):
    args, _ = run_test_sh(tmp_path, "-q", "-m", "not slurm")
    assert args == ["-m", "pytest", "-p", "no:cacheprovider", "--durations=25", "-q", "-m", "not slurm"]


def test_ci_runs_the_readme_test_command_without_durations_of_its_own():
    ci = [line for line in (REPO / ".ci" / "run").read_text().splitlines() if line.startswith("bash scripts/test.sh")]
    assert ci == ["bash scripts/test.sh -q"]
    assert "bash scripts/test.sh" in (REPO / "README.md").read_text()


def test_test_sh_says_how_to_get_chromium_where_it_is_missing(tmp_path):
    _, said = run_test_sh(tmp_path)
    assert said.count(SKIPPED) == 1 and len(said.splitlines()) == 1


@pytest.mark.parametrize("name", ["chromium", "chromium-browser"])  # the names tests/test_report_html.py looks for
def test_test_sh_says_nothing_of_chromium_where_it_is_there(tmp_path, name):
    _, said = run_test_sh(tmp_path, on_path=(name,))
    assert said == ""
