"""The control plane never pays for torch: status, submit --dry-run and collect run in a fresh interpreter
without importing torch, torchvision, lightning or torchmetrics (the import-linter contracts in pyproject.toml
check the same statically; this checks what really happens at run time, lazy imports included)."""

import json
import subprocess
import sys

from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.store.manifests import write_manifest

TRAINING_STACK = ("torch", "torchvision", "lightning", "torchmetrics")

PROBE = """
import json, sys
from cifarbench.cli import main
codes = [main(argv) for argv in json.loads(sys.argv[1])]
loaded = [m for m in {stack} if m in sys.modules]
print(json.dumps({{"codes": codes, "loaded": loaded}}))
"""


def _commands_in_a_fresh_interpreter(argvs: list[list[str]], cwd) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(stack=TRAINING_STACK), json.dumps(argvs)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=300,
    )
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1]) | {"stderr": out.stderr}


def test_status_submit_dry_run_and_collect_never_import_the_training_stack(write_records, tmp_path, synthetic_root):
    results = write_records(
        [{"seed": 0}, {"seed": 1}, {"seed": 2, "dataset": "synthetic10", "status": "failed", "error": "boom"}]
    )
    running = RunSpec(model="resnet20", dataset="cifar10", recipe=get_recipe("step-200"), batch_size=64, seed=3)
    entry = {"run_id": running.run_id, "job_id": "999999", "array_job_id": "999999", "array_index": 0}
    write_manifest(results, "local", None, [{**entry, "stderr": "x", "spec": running.to_dict()}])
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"models: [resnet20, resnet56]\ndatasets: [cifar10, synthetic10]\nopts: [step-200]\nbatch_sizes: [64]\n"
        f"seeds: [0, 1, 2, 3]\nresults: {results}\nroot: {synthetic_root}\nverify: false\n"
        "exclude: [{dataset: cifar10, seed: 2}, {dataset: cifar10, seed: 3}, {model: resnet56, dataset: cifar10}]\n"
        "slurm: {gpus_per_node: 0, cpus_per_task: 1, time: auto}\n"
    )
    found = _commands_in_a_fresh_interpreter(
        [
            ["status", str(results)],
            ["status", str(results), "--grid", str(grid), "--json"],
            ["submit", str(grid), "--dry-run"],
            ["collect", str(results), "--no-plots"],
            ["collect", str(results), "--out", str(tmp_path / "with-plots")],
        ],
        cwd=tmp_path,
    )
    assert (found["codes"], found["loaded"]) == ([0, 0, 0, 0, 0], []), found["stderr"]


def test_the_training_commands_do_import_it(tmp_path):
    # the probe can see torch when it is loaded: `models` reads its table, `run --help` nothing; a run trains
    found = _commands_in_a_fresh_interpreter([["models", "--json"]], cwd=tmp_path)
    assert found["codes"] == [0] and found["loaded"] == [], found["stderr"]
    failed = _commands_in_a_fresh_interpreter(
        [["run", "--model", "resnet20", "--dataset", "synthetic10", "--opt", "step-160", "--batch-size", "64",
          "--epochs", "1", "--data-root", str(tmp_path / "none"), "--results", str(tmp_path / "r")]],
        cwd=tmp_path,
    )  # fmt: skip
    assert failed["codes"] == [2] and "torch" in failed["loaded"], failed["stderr"]
