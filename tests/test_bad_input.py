"""Bad input: one clear line on stderr, exit code 2, nothing submitted, nothing deleted."""

import shutil
import subprocess

import pytest

from cifarbench.cli import main
from cifarbench.store.layout import Layout

GOOD = """\
models: [resnet20]
datasets: [synthetic10]
opts: [step-160]
epochs: 1
batch_sizes: [64]
seeds: [0]
root: {root}
results: {results}
"""

# (name, text replacing / added to the good grid, expected words in the message)
GRID_CASES = [
    ("yaml-syntax", "models: [resnet20\n", "line"),
    ("not-a-mapping", "- just\n- a list\n", "mapping"),
    ("axis-not-a-list", "batch_sizes: 64\n", "batch_sizes"),
    ("unknown-top-key", "model: [resnet20]\n", "did you mean 'models'"),
    ("unknown-model", "models: [resnet21]\n", "resnet21"),
    ("unknown-dataset", "datasets: [cifar11]\n", "cifar11"),
    ("unknown-recipe", "opts: [step-300]\n", "step-300"),
    ("empty-axis", "models: []\n", "models"),
    ("batch-size-zero", "batch_sizes: [0]\n", "batch_sizes"),
    ("batch-size-bool", "batch_sizes: [true]\n", "batch_sizes"),
    ("batch-size-float", "batch_sizes: [64.5]\n", "batch_sizes"),
    ("epochs-negative", "epochs: -1\n", "epochs"),
    ("seed-negative", "seeds: [-1]\n", "seeds"),
    ("seed-huge", "seeds: [1000000000000]\n", "seeds"),
    ("duplicate-key", "models: [resnet20]\nmodels: [resnet32]\n", "models"),
    ("time-bare-number", "slurm: {time: 1:00:00}\n", "3600"),
    ("time-int", "slurm: {time: 60}\n", "time"),
    ("time-bad-hours", 'slurm: {time: "1-25:00:00"}\n', "time"),
    ("time-words", 'slurm: {time: "two hours"}\n', "time"),
    ("time-zero", 'slurm: {time: "00:00:00"}\n', "time"),
    ("time-bad-seconds", 'slurm: {time: "00:10:75"}\n', "time"),
    ("partition-shell", 'slurm: {partition: "gpu; rm -rf ~"}\n', "partition"),
    ("account-newline", 'slurm: {account: "a\\nb"}\n', "account"),
    ("setup-nul", 'slurm: {setup: ["module load cuda\\0"]}\n', "setup"),
    ("extra-not-allowed", 'slurm: {extra: {wrap: "rm -rf ~"}}\n', "wrap"),
    ("extra-metachar", 'slurm: {extra: {comment: "$(reboot)"}}\n', "comment"),
    ("unknown-slurm-key", "slurm: {gpus: 1}\n", "slurm"),
    ("negative-gpus", "slurm: {gpus_per_node: -1}\n", "gpus_per_node"),
    ("include-unknown-key", "include: [{model: resnet20, colour: red}]\n", "colour"),
    ("exclude-everything", "exclude: [{model: resnet20}]\n", "exclude"),
    (
        "inline-recipe-unknown-key",
        "opts: [{name: mine, epochs: 2, weight_decay: 0.0005, schedule: cos, lrr: 0.1}]\n",
        "lrr",
    ),
    ("loader-unknown", "loader: dali\n", "loader"),
]


@pytest.fixture
def workspace(tmp_path, synthetic_root):
    results = tmp_path / "results"
    results.mkdir()
    keep = results / "keep.txt"  # something of the user's that must survive every error
    keep.write_text("mine")
    return {"root": synthetic_root, "results": results, "tmp": tmp_path, "keep": keep}


def _jobs():
    if not shutil.which("squeue"):
        return None
    out = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True)
    return out.stdout if out.returncode == 0 else None


def _assert_rejected(capsys, argv, expect, ws):
    before = _jobs()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err
    assert err.count("\n") == 1 and err.startswith("cifarbench: error: "), err
    assert "Traceback" not in err + captured.out
    assert expect.lower() in err.lower(), err
    assert not (ws["results"] / "submissions").exists() and not (ws["results"] / "runs").exists()
    assert ws["keep"].read_text() == "mine"
    assert _jobs() == before


def _grid(ws, patch):
    good = GOOD.format(root=ws["root"], results=ws["results"])
    keys = {line.split(":")[0] for line in patch.splitlines() if ":" in line and not line.startswith((" ", "-"))}
    kept = [line for line in good.splitlines() if line.split(":")[0] not in keys]
    path = ws["tmp"] / "grid.yaml"
    path.write_text(("\n".join(kept) + "\n" + patch) if not patch.startswith("-") else patch)
    return path


@pytest.mark.parametrize("name, patch, expect", GRID_CASES, ids=[c[0] for c in GRID_CASES])
def test_submit_rejects_bad_grids(name, patch, expect, workspace, capsys):
    grid = _grid(workspace, patch)
    _assert_rejected(capsys, ["submit", str(grid)], expect, workspace)


def _run_argv(ws, **changes):
    argv = {
        "--model": "resnet20",
        "--dataset": "synthetic10",
        "--opt": "step-160",
        "--batch-size": "64",
        "--epochs": "1",
        "--data-root": str(ws["root"]),
        "--results": str(ws["results"]),
    }
    argv.update({f"--{k.replace('_', '-')}": v for k, v in changes.items()})
    return ["run", *(x for kv in argv.items() for x in kv)]


# (name, argv made from the workspace, expected words in the message); "{tmp}", "{grid}", "{results}" and
# "{afile}" are filled in from the workspace
ARGV_CASES = [
    ("submit-missing-grid", ["submit", "{tmp}/missing.yaml"], "missing.yaml"),
    ("submit-folder", ["submit", "{tmp}"], "cannot read"),
    ("submit-force-and-retry", ["submit", "{grid}", "--force", "--retry-failed"], "pick one"),
    ("submit-bad-executor", ["submit", "{grid}", "--executor", "pbs"], "invalid choice"),
    ("submit-bogus-flag", ["submit", "{grid}", "--bogus"], "unrecognized"),
    ("run-unknown-dataset", {"dataset": "cifar11"}, "invalid choice"),
    ("run-batch-size-zero", {"batch_size": "0"}, "integer >= 1"),
    ("run-epochs-negative", {"epochs": "-1"}, "integer >= 1"),
    ("run-seed-negative", {"seed": "-3"}, "integer >= 0"),
    ("run-fp16-on-cpu", {"precision": "16-mixed"}, "needs a GPU"),
    ("status-missing", ["status", "{tmp}/nope"], "does not exist"),
    ("status-a-file", ["status", "{afile}"], "not a folder"),
    ("status-missing-grid", ["status", "{results}", "--grid", "{tmp}/missing.yaml"], "missing.yaml"),
    ("data-train-size-zero", ["data", "synthetic", "--root", "{tmp}/d", "--train-size", "0"], "integer >= 1"),
    ("data-root-below-a-file", ["data", "synthetic", "--root", "{afile}/below"], "cannot write"),
    ("download-synthetic", ["data", "download", "--root", "{tmp}", "--dataset", "synthetic10"], "invalid choice"),
    ("models-extra-argument", ["models", "--json", "extra"], "unrecognized"),
    ("no-command", [], "required"),
]
# `run` with missing data leaves a failed record by design, so these are checked apart
MISSING_DATA_CASES = [
    ("run-data-root-missing", {"data_root": "{tmp}/nowhere"}),
    ("run-data-root-a-file", {"data_root": "{afile}"}),
]


def _argv(ws, template) -> list[str]:
    afile = ws["tmp"] / "a-file"
    afile.write_text("x")
    fill = {"tmp": ws["tmp"], "grid": _grid(ws, ""), "results": ws["results"], "afile": afile}
    if isinstance(template, dict):
        return _run_argv(ws, **{k: v.format(**fill) for k, v in template.items()})
    return [arg.format(**fill) for arg in template]


@pytest.mark.parametrize("name, template, expect", ARGV_CASES, ids=[c[0] for c in ARGV_CASES])
def test_bad_command_lines(name, template, expect, workspace, capsys):
    _assert_rejected(capsys, _argv(workspace, template), expect, workspace)


@pytest.mark.parametrize("name, template", MISSING_DATA_CASES, ids=[c[0] for c in MISSING_DATA_CASES])
def test_run_without_data_is_one_line_and_a_failed_record(name, template, workspace, capsys):
    before = _jobs()
    assert main(_argv(workspace, template)) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "not found" in err and workspace["keep"].read_text() == "mine"
    assert _jobs() == before


def test_there_are_enough_bad_input_cases():
    assert len(ARGV_CASES) + len(MISSING_DATA_CASES) + len(GRID_CASES) >= 50


def test_a_checkpoint_of_another_run_is_one_clear_error(workspace, capsys):
    base = [
        "run",
        "--model",
        "resnet20",
        "--dataset",
        "synthetic10",
        "--opt",
        "step-160",
        "--batch-size",
        "64",
        "--epochs",
        "1",
        "--data-root",
        str(workspace["root"]),
        "--results",
        str(workspace["results"]),
    ]
    assert main(base + ["--seed", "1"]) == 0
    capsys.readouterr()
    [other] = (workspace["results"] / "runs").iterdir()
    from cifarbench.config.spec import RunSpec, get_recipe
    from cifarbench.store.datasets import fingerprint

    spec = RunSpec(
        model="resnet20",
        dataset="synthetic10",
        recipe=get_recipe("step-160"),
        batch_size=64,
        seed=0,
        epochs=1,
        data_fingerprint=fingerprint("synthetic10", workspace["root"]),  # as `cifarbench run` names the run
    )
    target = Layout(workspace["results"]).run_dir(spec.run_id)
    target.mkdir(parents=True)
    shutil.copy(other / "last.ckpt", target / "last.ckpt")
    assert main(base + ["--seed", "0"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"checkpoint belongs to run '{other.name}'" in err
    assert (target / "last.ckpt").exists() and (other / "record.parquet").exists()
