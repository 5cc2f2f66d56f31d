"""Probes of the compute nodes: which jobs a grid's tasks make (pure), what their answers mean (pure, on node
reports and recorded logs), and on the real local cluster a probe that passes and one that fails (a ``python:``
that does not exist), which stops the submission."""

import shutil
import subprocess
from pathlib import Path

import pytest

from cifarbench.cli import main
from cifarbench.cluster import probe
from cifarbench.cluster.estimate import Estimate
from cifarbench.cluster.plan import Task
from cifarbench.config.resources import Resources
from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.store.layout import Layout
from cifarbench.train.probe import node_report

RECORDED = Path(__file__).parent / "recorded"


def spec(seed: int = 0) -> RunSpec:
    return RunSpec(model="resnet20", dataset="cifar10", recipe=get_recipe("step-160"), batch_size=128, seed=seed)


def _task(r: Resources, *specs: RunSpec) -> Task:
    estimate = Estimate(seconds=60.0, source="prior", detail="")
    return Task(specs=specs, fused=False, resources=r, estimate=estimate, auto=False, capped=False)


def test_one_probe_per_environment_and_partition():
    gpu = Resources(gpus_per_node=4, gpu_type="a100", cpus_per_task=16, mem_gb=64, pack=8, time="10:00:00")
    tasks = [
        _task(gpu, spec(seed=0)),
        _task(Resources(gpus_per_node=4, gpu_type="a100", cpus_per_task=8, time="01:00:00"), spec(seed=1)),
        _task(Resources(gpus_per_node=4, gpu_type="a100", python="/opt/env/bin/python"), spec(seed=2)),
        _task(Resources(gpus_per_node=0, partition="cpu", extra={"hold": True, "reservation": "r"}), spec(seed=3)),
    ]
    got = probe.probes(tasks)
    assert [p.label for p in got] == [
        "default partition: this python, a100",
        "default partition: /opt/env/bin/python, a100",
        "cpu: this python",
    ]
    first = got[0].resources
    assert (first.gpus_per_node, first.gpu_type, first.cpus_per_task, first.mem_gb, first.time, first.pack) == (
        1, "a100", 1, probe.PROBE_MEM_GB, probe.PROBE_TIME, 1,
    )  # fmt: skip
    assert got[0].gpus == 4 and got[2].gpus == 0
    assert dict(got[2].resources.extra) == {"reservation": "r"}  # a held probe would never start
    assert got[0].datasets == ((spec().dataset, str(spec().data_root)),)


def _report(**changes) -> dict:
    report = {
        "node": "gpu07",
        "python": "/opt/env/bin/python",
        "python_version": "3.12.4",
        "container": None,
        "versions": {
            "torch": "2.11.0+cu128",
            "torchvision": "0.26.0",
            "lightning": "2.6.0",
            "submitit": "1.5.4",
            "cifarbench": "0.1.0",
        },
        "git_commit": "abcdef1234567890",
        "visible_devices": ["0"],
        "gpu_name": "NVIDIA H200",
        "gpu_count": 1,
        "gpu_memory_gb": 139.8,
        "data": {"cifar10 in /data": None},
        "results": None,
    }
    return report | changes


def _outcome(gpus: int = 1, **changes) -> probe.Outcome:
    p = probe.Probe(resources=Resources(), label="gpu: this python, gpu", gpus=gpus, results="/r", datasets=())
    return probe.Outcome(probe=p, report=_report(**changes), job_id="7")


HERE = ("0.1.0", "abcdef1234567890")


def test_a_node_that_has_everything_passes_and_is_tabled():
    outcomes = [_outcome()]
    assert probe.problems(outcomes) == [] and probe.notes(outcomes, here=HERE) == []
    header, row = probe.table(outcomes, here=HERE)
    assert header.split() == ["probe", "node", "python", "torch", "torchvision", "lightning", "cifarbench", "GPU",
                              "data", "results"]  # fmt: skip
    assert "gpu07" in row and "1x NVIDIA H200 (139.8 GB)" in row and "3.12.4 /opt/env/bin/python" in row
    assert row.rstrip().endswith("ok    writable")


def test_what_stops_a_submission_is_one_line_each():
    versions = _report()["versions"] | {"lightning": "missing: ModuleNotFoundError: No module named 'lightning'"}
    outcomes = [
        _outcome(versions=versions),
        _outcome(gpu_count=0, gpu_name=None, visible_devices=["0"]),
        _outcome(
            data={"cifar10 in /data": "dataset cifar10 not found in /data"},
            results="results folder /r is not writable (Read-only file system)",
        ),
        probe.Outcome(probe=_outcome().probe, error="job 9 failed: execve(): /nope: No such file or directory"),
    ]
    assert probe.problems(outcomes) == [
        "probe of gpu: this python, gpu on gpu07: /opt/env/bin/python cannot import lightning (missing: "
        "ModuleNotFoundError: No module named 'lightning'); install it there, or set slurm.python or slurm.container",
        "probe of gpu: this python, gpu on gpu07: torch 2.11.0+cu128 sees no GPU (CUDA_VISIBLE_DEVICES: 0), so the "
        "runs would train on CPUs; use a CUDA build of torch there, or gpus_per_node: 0",
        "probe of gpu: this python, gpu on gpu07: dataset cifar10 not found in /data",
        "probe of gpu: this python, gpu on gpu07: results folder /r is not writable (Read-only file system)",
        "probe of gpu: this python, gpu: job 9 failed: execve(): /nope: No such file or directory",
    ]
    rows = probe.table(outcomes, here=HERE)[1:]
    assert "missing" in rows[0] and "none" in rows[1] and "missing  not writable" in rows[2] and "failed" in rows[3]
    # runs that ask for no GPU are not refused for a node without one
    assert probe.problems([_outcome(gpus=0, gpu_count=0, gpu_name=None)]) == []


def test_another_cifarbench_on_the_node_is_a_note():
    other = _outcome(git_commit="1234567890ffff")
    assert probe.problems([other]) == []
    assert probe.notes([other], here=HERE) == [
        "note: cifarbench on gpu07 (gpu: this python, gpu) is 0.1.0 at 1234567890, here 0.1.0 at abcdef1234: runs "
        "there train with that one"
    ]
    assert "0.1.0 (differs)" in probe.table([other], here=HERE)[1]
    assert probe.notes([_outcome(git_commit=None)], here=HERE) == []  # a commit not known on one side says nothing


def test_a_failed_probe_says_why_in_its_last_error_line():
    text = (RECORDED / "probe-missing-python.err").read_text()
    assert "No such file or directory" in probe.said(text)
    assert probe.said("", state="FAILED") == "no output (FAILED)"
    assert probe.said("starting\nTraceback\nValueError: boom\n") == "ValueError: boom"


def test_the_node_report_here(synthetic_root, tmp_path):
    report = node_report(str(tmp_path / "res"), [("synthetic10", str(synthetic_root)), ("synthetic10", "/nowhere")])
    assert report["versions"]["torch"] and not report["versions"]["cifarbench"].startswith("missing")
    assert report["results"] is None and (tmp_path / "res").is_dir()
    assert report["data"][f"synthetic10 in {synthetic_root}"] is None
    assert "not found in /nowhere" in report["data"]["synthetic10 in /nowhere"]


# --- on the real local cluster ----------------------------------------------------------------------------------

_CLUSTER = (
    shutil.which("sbatch") and "UP" in subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout
)

GRID = """\
models: [resnet20]
datasets: [synthetic10]
opts: [step-160]
batch_sizes: [64]
seeds: [0, 1]
epochs: 1
root: {root}
results: {results}
slurm: {{gpus_per_node: {gpus}, cpus_per_task: 1, time: "00:10:00"}}
{rules}"""


def _grid(tmp_path, root, *, gpus: int = 0, rules: str = "") -> Path:
    path = tmp_path / "grid.yaml"
    path.write_text(GRID.format(root=root, results=tmp_path / "results", gpus=gpus, rules=rules))
    return path


@pytest.mark.slurm
@pytest.mark.skipif(not _CLUSTER, reason="no local SLURM cluster (bash slurm/cluster.sh up)")
def test_a_failing_probe_stops_the_submission(tmp_path, synthetic_root, capsys):
    rules = "resources:\n  - match: {seed: 1}\n    python: /nope/bin/python\n"
    grid = _grid(tmp_path, synthetic_root, rules=rules)
    assert main(["submit", str(grid), "--probe", "--probe-timeout", "300"]) == 2
    out, err = capsys.readouterr()
    good = next(line for line in out.splitlines() if line.startswith("default partition: this python"))
    assert " vm " in good and good.rstrip().endswith("not asked  ok    writable"), out
    assert "probe of default partition: /nope/bin/python: job " in err and "No such file or directory" in err, err
    assert "nothing was submitted" in err
    assert not Layout(tmp_path / "results").submissions.exists()  # nothing queued, no manifest


@pytest.mark.slurm
@pytest.mark.extended
@pytest.mark.skipif(not _CLUSTER, reason="no local SLURM cluster (bash slurm/cluster.sh up)")
def test_probe_passes_and_finds_no_gpu_behind_placeholder_gpus(tmp_path, synthetic_root, capsys):
    assert main(["probe", str(_grid(tmp_path, synthetic_root)), "--timeout", "300"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].startswith("probing 1 environment (slurm)") and "\n" + "probe " in out, out
    # the local cluster's GPUs are placeholders: a grid asking for one is told its torch sees none there
    assert main(["probe", str(_grid(tmp_path, synthetic_root, gpus=1)), "--timeout", "300"]) == 2
    err = capsys.readouterr().err
    assert "sees no GPU (CUDA_VISIBLE_DEVICES: 0)" in err, err


@pytest.mark.extended
def test_probe_runs_locally_without_slurm(tmp_path, synthetic_root, capsys):
    assert main(["probe", str(_grid(tmp_path, synthetic_root)), "--executor", "local", "--timeout", "300"]) == 0
    out = capsys.readouterr().out
    assert "probing 1 environment (local)" in out and "writable" in out, out
