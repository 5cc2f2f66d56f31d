"""The node's environment (``python:``, ``container:``): the exact command lines built for an interpreter, a
launcher prefix and an Apptainer/Singularity image (pure), a job on the real local cluster that ran through a
stand-in launcher, and (extended) a run through a stand-in ``apptainer`` that logs the command it was given."""

import json
import os
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from cifarbench.cli import main
from cifarbench.cluster.environment import CHECKOUT, find_runtime, python_command
from cifarbench.config.grid import load_grid
from cifarbench.config.resources import Resources
from cifarbench.store import records
from cifarbench.store.datasets import fingerprint
from cifarbench.store.layout import Layout
from cifarbench.train import data

IMAGE = "/images/bench.sif"
BINDS = ["/scratch/results", "/data/cifar"]


def _command(runtime: str = "apptainer", binds=BINDS, **fields) -> str | None:
    return python_command(Resources(**fields), binds=binds, runtime=runtime, checkout="/src/cifarbench")


def _nowhere(name: str) -> None:
    return None


# --- the command line (pure) ---------------------------------------------------------------------------------------


def test_without_python_or_container_submitit_runs_this_interpreter():
    assert _command() is None


@pytest.mark.parametrize(
    "python",
    [
        "/opt/envs/bench/bin/python",
        "conda run --no-capture-output -n bench python",
        "srun --mpi=none /opt/x/bin/python",
    ],
)
def test_python_is_the_command_as_written(python):
    assert _command(python=python) == python


def test_an_image_runs_with_the_gpus_and_the_folders_bound():
    assert _command("/usr/bin/apptainer", container=IMAGE) == (
        "/usr/bin/apptainer exec --nv --bind /scratch/results,/data/cifar,/src/cifarbench "
        "--env PYTHONPATH=/src/cifarbench /images/bench.sif python3"
    )


def test_a_cpu_task_gets_no_nv_and_python_names_the_interpreter_inside_the_image():
    assert _command(container=IMAGE, gpus_per_node=0, python="/opt/conda/envs/bench/bin/python -X faulthandler") == (
        "apptainer exec --bind /scratch/results,/data/cifar,/src/cifarbench --env PYTHONPATH=/src/cifarbench "
        "/images/bench.sif /opt/conda/envs/bench/bin/python -X faulthandler"
    )


def test_each_folder_is_bound_once_and_not_inside_another():
    binds = ["/scratch/results", "/scratch/results/", "/data", "/data/cifar", "/src/cifarbench/data", "/scratch/r2"]
    assert _command(binds=binds, container=IMAGE).split()[4] == "/scratch/results,/data,/scratch/r2,/src/cifarbench"


def test_paths_with_spaces_are_quoted():
    command = _command("/opt/my tools/apptainer", binds=["/my results", "/data"], container="/my images/b.sif")
    assert command == (
        "'/opt/my tools/apptainer' exec --nv --bind '/my results,/data,/src/cifarbench' "
        "--env PYTHONPATH=/src/cifarbench '/my images/b.sif' python3"
    )
    assert shlex.split(command)[4] == "/my results,/data,/src/cifarbench"


@pytest.mark.parametrize("path", ["/scratch/a,b", "/scratch/run:1"])
def test_a_path_apptainer_cannot_bind_is_an_error_naming_it(path):
    with pytest.raises(ValueError, match=rf"^container: '{path}' cannot be bound into the image"):
        _command(binds=[path], container=IMAGE)


def test_the_runtime_is_the_first_found_on_the_path_or_the_one_set():
    found = {"singularity": "/opt/singularity/bin/singularity", "apptainer": "/usr/bin/apptainer"}
    image = Resources(container=IMAGE)
    assert find_runtime(image, which=found.get) == "/usr/bin/apptainer"
    assert find_runtime(image, which={"singularity": found["singularity"]}.get) == "/opt/singularity/bin/singularity"
    assert find_runtime(image, which=_nowhere) == "apptainer"  # for the nodes' PATH to find
    assert find_runtime(Resources(container=IMAGE, container_runtime="singularity"), which=found.get) == "singularity"
    singularity = _command(find_runtime(image, which={"singularity": found["singularity"]}.get), container=IMAGE)
    assert singularity is not None and singularity.startswith("/opt/singularity/bin/singularity exec --nv --bind ")


def test_the_checkout_is_the_folder_that_holds_this_cifarbench():
    assert (Path(CHECKOUT) / "cifarbench" / "__init__.py").is_file()
    command = python_command(Resources(container=IMAGE), binds=[], runtime="apptainer")
    assert command == f"apptainer exec --nv --bind {CHECKOUT} --env PYTHONPATH={CHECKOUT} {IMAGE} python3"


GRID = """\
models: [resnet20]
datasets: [synthetic10]
opts: [cos-200]
epochs: 1
batch_sizes: [64]
seeds: {seeds}
precision: 32-true
root: {root}
results: {results}
slurm:
  gpus_per_node: 0
  cpus_per_task: 1
  time: "00:10:00"
  setup: ["export OMP_NUM_THREADS=1"]
"""


@pytest.fixture(scope="module")
def tiny_root(tmp_path_factory):
    """synthetic10 with 64 training and 64 test images: one step per epoch."""
    root = tmp_path_factory.mktemp("tiny")
    data.write_synthetic("synthetic10", root, train_size=64, test_size=64)
    return root


def _grid(tmp_path: Path, root, *, slurm: str = "", rules: str = "", seeds: str = "[0]") -> Path:
    """A grid of ``seeds`` (one run each) with more ``slurm:`` lines (indented) and ``rules`` after it."""
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID.format(root=root, results=tmp_path / "results", seeds=seeds) + slurm + rules)
    return grid


def test_local_execution_refuses_runs_in_two_environments(tmp_path, tiny_root, capsys):
    rules = "resources: [{match: {seed: 1}, python: /opt/envs/bench/bin/python}]\n"
    grid = _grid(tmp_path, tiny_root, rules=rules, seeds="[0, 1]")
    assert main(["submit", str(grid), "--executor", "local"]) == 2
    err = capsys.readouterr().err
    assert (
        err.startswith("cifarbench: error: --executor local runs every run in one environment") and err.count("\n") == 1
    ), err
    assert not Layout(tmp_path / "results").submissions.exists()


def _stand_in(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(0o755)
    return path


def _submit_and_wait(grid: Path, executor: str) -> dict:
    """Submit ``grid``'s one run, wait for it, and return its record (its job cancelled if the wait fails)."""
    results = Path(load_grid(grid).results)
    try:
        assert main(["submit", str(grid), "--executor", executor, "--wait"]) == 0
    finally:
        if executor == "slurm":
            manifests = list(Layout(results).submissions.glob("*.json"))
            jobs = {e["array_job_id"] for m in manifests for e in json.loads(m.read_text())["runs"]}
            if jobs:
                subprocess.run(["scancel", *sorted(jobs)], capture_output=True, timeout=60)
    [spec] = load_grid(grid, fingerprint=fingerprint).specs
    record = records.read_record(Layout(results).record(spec.run_id))
    assert record is not None
    return record


def _cluster_up() -> bool:
    if not (shutil.which("sbatch") and shutil.which("scontrol")):
        return False
    return "UP" in subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30).stdout


_CLUSTER = _cluster_up()


# --- a job through a launcher, on the real cluster -----------------------------------------------------------------


@pytest.mark.slurm
@pytest.mark.skipif(not _CLUSTER, reason="no local SLURM cluster (bash slurm/cluster.sh up)")
def test_a_slurm_job_runs_through_the_launcher_python_names(tmp_path, tiny_root, capsys):
    marker = tmp_path / "launched"
    launcher = _stand_in(
        tmp_path / "bin" / "launcher.sh", f'printf "%s\\n" "$@" > {marker}\nexec {sys.executable} "$@"\n'
    )
    grid = _grid(tmp_path, tiny_root, slurm=f"  python: {launcher}\n")
    record = _submit_and_wait(grid, "slurm")
    assert "completed: 1" in capsys.readouterr().out
    folder = Layout(tmp_path / "results").slurm_logs
    assert marker.read_text().splitlines() == ["-u", "-m", "submitit.core._submit", str(folder)]
    assert record["status"] == "completed" and record["slurm_job_id"] is not None
    assert record["python"] == sys.executable and record["container"] is None


# --- a run in a stand-in image (extended) --------------------------------------------------------------------------

# What apptainer does with the command line cifarbench builds, as far as a run can tell: log it, check the image,
# set the variables it sets inside (--env's, and APPTAINER_CONTAINER), run the command after the image.
FAKE_APPTAINER = """\
printf "%s\\n" "$@" > {log}
[ "$1" = exec ] || exit 64
shift
while [ $# -gt 0 ]; do
  case "$1" in
    --nv) shift ;;
    --bind) shift 2 ;;
    --env) export "$2"; shift 2 ;;
    *) break ;;
  esac
done
[ "$1" = "{image}" ] || {{ echo "fake apptainer: $1 is not {image}" >&2; exit 65; }}
[ -f "$1" ] || {{ echo "fake apptainer: no image $1" >&2; exit 66; }}
export APPTAINER_CONTAINER="$1"
shift
exec "$@"
"""


@pytest.mark.extended
@pytest.mark.parametrize("executor", ["local", pytest.param("slurm", marks=pytest.mark.slurm)])
def test_a_run_in_an_image_runs_the_command_built_for_it(tmp_path, tiny_root, capsys, monkeypatch, executor):
    if executor == "slurm" and not _CLUSTER:
        pytest.skip("no local SLURM cluster (bash slurm/cluster.sh up)")
    image, log = tmp_path / "img.sif", tmp_path / "apptainer.log"
    image.write_bytes(b"")
    runtime = _stand_in(tmp_path / "bin" / "apptainer", FAKE_APPTAINER.format(log=log, image=image))
    monkeypatch.setenv("PATH", f"{runtime.parent}:{os.environ['PATH']}")  # sbatch passes it on to the job
    # the interpreter "inside the image" is this one: the stand-in runs the command on this host
    grid = _grid(tmp_path, tiny_root, slurm=f"  container: {image}\n  python: {sys.executable}\n")
    record = _submit_and_wait(grid, executor)
    resources = Resources(container=str(image), python=sys.executable, gpus_per_node=0)
    built = python_command(resources, binds=[str(tmp_path / "results"), str(tiny_root)], runtime=str(runtime))
    assert built is not None and shlex.split(built)[0] == str(runtime)
    layout = Layout(tmp_path / "results")
    folder = layout.slurm_logs if executor == "slurm" else layout.local_logs
    assert log.read_text().splitlines() == [*shlex.split(built)[1:], "-u", "-m", "submitit.core._submit", str(folder)]
    assert record["status"] == "completed", record["error"]
    assert record["container"] == str(image) and record["python"] == sys.executable
