"""The manual runs as written: the `cifarbench ...` commands of README.md's and docs/*.md's code blocks, and the
relative links between the pages.

A command is a line of a fenced code block that starts with `cifarbench ` (after an optional `$ `). Those that name
a file the repository ships (a grid under jobs/), and every command of a shell block (```bash), run in this
process from a folder holding copies of the shipped files they name, so that relative paths and a grid's
`root: data` and `results: results` resolve as they would in a checkout and nothing is written into it:
- `submit` as a dry run (`--dry-run` added where the line lacks it); a grid that reads the real CIFAR, which a test
  cannot download, also gets `--no-preflight`, and a grid of synthetic data finds it under `data/`;
- `run`, `bench` and `data`, which would train, measure or download, with `--help` (their options still parse);
- `status` and `collect` of a results folder with `--help`, unless the repository ships records in that folder
  (the shipped `results/` holds only its README);
- anything else (`models`) as written.
Lines of a block that is output (a table whose rows start with `cifarbench status ...`) are not commands unless
they name a shipped file."""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from cifarbench.cli import main
from cifarbench.config.spec import REAL_DATASETS

REPO = Path(__file__).resolve().parents[1]
PAGES = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SHELL_BLOCKS = {"bash", "sh", "shell", "console"}
HELP_ONLY = {"run", "bench", "data"}
READS_RESULTS = {"status", "collect"}


def _shipped() -> set[str]:
    """The repository's files as a commit would hold them (tracked, or new and not ignored), and their folders."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        files = set(out.splitlines())
    except (OSError, subprocess.CalledProcessError):  # not a git checkout: what is on disk
        files = {str(p.relative_to(REPO)) for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts}
    return files | {str(parent) for f in files for parent in Path(f).parents if str(parent) != "."}


SHIPPED = _shipped()


def _blocks(page: Path):
    """(line number, info string, line) of every line inside the page's fenced code blocks."""
    info = None
    for number, line in enumerate(page.read_text(encoding="utf-8").splitlines(), 1):
        if line.startswith("```"):
            info = line[3:].strip() if info is None else None
        elif info is not None:
            yield number, info, line


def _named(argv: list[str]) -> list[str]:
    return [arg for arg in argv if not arg.startswith("-") and arg.rstrip("/") in SHIPPED]


def _commands() -> list[tuple[str, list[str]]]:
    found = []
    for page in PAGES:
        for number, info, line in _blocks(page):
            if m := re.match(r"(?:\$ )?cifarbench (.*)", line):
                argv = shlex.split(m[1], comments=True)
                if _named(argv) or info in SHELL_BLOCKS:
                    found.append(
                        (f"{page.relative_to(REPO)}:{number}: cifarbench {m[1].split('  #')[0].rstrip()}", argv)
                    )
    return found


COMMANDS = _commands()


def _as_run(argv: list[str]) -> list[str]:
    """The command as this test runs it (see the module's docstring)."""
    command = argv[0]
    if command in HELP_ONLY:
        return [*argv, "--help"]
    if command in READS_RESULTS:
        folder = next((a for a in argv[1:] if not a.startswith("-")), None)
        ships_records = folder is not None and f"{folder.rstrip('/')}/runs" in SHIPPED
        return argv if ships_records else [*argv, "--help"]
    if command == "submit":
        grid = yaml.safe_load((REPO / argv[1]).read_text(encoding="utf-8"))
        datasets = set(grid.get("datasets", [])) | {i.get("dataset") for i in grid.get("include", [])}
        extra = ["--dry-run"] if "--dry-run" not in argv else []
        if datasets & set(REAL_DATASETS) and "--no-preflight" not in argv:
            extra.append("--no-preflight")
        return [*argv, *extra]
    return argv


def _synthetic_grid(argv: list[str]) -> bool:
    if argv[0] != "submit":
        return False
    grid = yaml.safe_load((REPO / argv[1]).read_text(encoding="utf-8"))
    return not set(grid.get("datasets", [])) & set(REAL_DATASETS)


def test_the_docs_show_commands_that_name_shipped_files():
    assert any(_named(argv) for _, argv in COMMANDS), "no command of the docs names a shipped file"


@pytest.mark.parametrize("where, argv", COMMANDS, ids=[where.split(": ", 1)[0] for where, _ in COMMANDS])
def test_a_command_of_the_docs_runs_as_written(where, argv, tmp_path, monkeypatch, capsys, request):
    for name in _named(argv):
        source, copy = REPO / name, tmp_path / name
        copy.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, copy, dirs_exist_ok=True)
        else:
            shutil.copy(source, copy)
    if _synthetic_grid(argv):
        (tmp_path / "data").symlink_to(request.getfixturevalue("synthetic_root"))
    monkeypatch.chdir(tmp_path)
    run = _as_run(argv)
    try:
        code = main(run)
    except SystemExit as exc:  # --help
        code = exc.code or 0
    out = capsys.readouterr()
    assert code == 0, f"{where}\n  ran: cifarbench {shlex.join(run)}\n  exit {code}\n{out.err[-2000:]}{out.out[-2000:]}"


LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _anchors(page: Path) -> set[str]:
    """GitHub's ids of the page's headings: lower case, punctuation dropped, spaces as hyphens."""
    text = page.read_text(encoding="utf-8")
    headings = re.findall(r"^#+ (.*)$", re.sub(r"(?ms)^```.*?^```", "", text), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def _links(page: Path):
    text = re.sub(r"(?ms)^```.*?^```", "", page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    yield from LINK.findall(text)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(REPO)) for p in PAGES])
def test_every_relative_link_leads_to_a_file_and_heading_that_exist(page):
    broken = []
    for target in _links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in _anchors(file):
            broken.append(f"{target}: no heading #{anchor}")
    assert not broken, f"{page.relative_to(REPO)}: " + "; ".join(broken)


def test_the_readme_links_to_every_docs_page():
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    assert [p.name for p in PAGES[1:] if f"](docs/{p.name})" not in readme] == []
