import pyarrow.parquet as pq
import pytest
import torch

from cifarbench.bench import pack, pipeline, rows, timing, train
from cifarbench.cli import main
from cifarbench.errors import UsageError
from cifarbench.store import records
from cifarbench.system import usable_cores
from cifarbench.train.fit import FastPath

CPU = torch.device("cpu")
TINY = dict(steps=2, warmup=1, repeats=2)


def _check_rows(measured, what):
    base = [r for r in measured if r["baseline"]]
    assert len(base) == 1 and base[0]["ratio"] == pytest.approx(1.0)
    for r in measured:
        assert r["what"] == what and set(r) <= set(rows.SCHEMA.names)
        assert r["device"] == "cpu" and r["torch_version"] == torch.__version__
        assert r["cpu_cores"] == usable_cores() and r["torch_threads"] == torch.get_num_threads()
        if r["images_per_s"] is not None:
            assert r["images_per_s"] > 0
            if "whole epoch" not in r["variant"]:  # a median of the repeated windows, between the slowest and fastest
                assert r["images_per_s_min"] <= r["images_per_s"] <= r["images_per_s_max"]
            assert r["ratio"] == pytest.approx(r["images_per_s"] / base[0]["images_per_s"])


def test_pipeline_rows_compare_the_device_loader_with_the_dataloader_on_all_cores(synthetic_root):
    measured = list(
        pipeline.bench_pipeline(dataset="synthetic10", root=synthetic_root, batch_size=32, device=CPU, **TINY)
    )
    _check_rows(measured, "pipeline")
    first, last = measured[0], measured[-1]
    assert first["baseline"] and first["loader"] == "torchvision" and first["workers"] == usable_cores()
    assert [r["workers"] for r in measured[:-1]] == pipeline.baseline_workers()
    assert last["variant"] == "device loader" and last["loader"] == "device"
    assert all(r["dataset"] == "synthetic10" and r["batch_size"] == 32 and r["steps"] == 2 for r in measured)


def test_train_rows_cover_baseline_fast_path_levers_and_lightning_fit(synthetic_root, monkeypatch):
    modes = []

    def broken_compile(model, *, mode, **options):  # also what nn.Module.compile calls, for a run's compile option
        modes.append(mode)

        def run(x):
            raise RuntimeError("no compiler\nsecond line")

        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    measured = train.bench_train(
        model="resnet20",
        dataset="synthetic100",
        root=synthetic_root,
        batch_size=8,
        device=CPU,
        compile=True,
        with_levers=True,
        steps=1,
        warmup=1,
        repeats=1,
    )
    measured = list(measured)
    _check_rows(measured, "train")
    by_variant = {r["variant"]: r for r in measured}
    assert list(by_variant) == [
        "baseline: PIL DataLoader, eager",
        "fast path",
        "fast path, precision bf16-mixed",
        "fast path, channels_last off",
        "fast path, fused SGD on",
        "fast path + torch.compile",
        "lightning fit",
        "lightning fit, whole epoch (record)",
        "lightning fit, torch.compile default",
    ]
    assert by_variant["baseline: PIL DataLoader, eager"]["workers"] == usable_cores()
    assert by_variant["fast path, precision bf16-mixed"]["precision"] == "bf16-mixed"
    assert all(r["precision"] == "32-true" for v, r in by_variant.items() if "bf16" not in v)
    assert all(r["model"] == "resnet20" for r in measured)
    assert all(by_variant[v]["images_per_s"] > 0 for v in by_variant if "compile" not in v)
    failed = by_variant["fast path + torch.compile"]
    assert modes == ["default", "default"] and failed["images_per_s"] is None and failed["ratio"] is None
    assert failed["note"] == "torch.compile failed: RuntimeError: no compiler"
    fell_back = by_variant["lightning fit, torch.compile default"]  # the run trained eagerly, and says so
    assert fell_back["images_per_s"] > 0 and fell_back["note"] == "trained eagerly: RuntimeError: no compiler"
    assert fell_back.get("minutes_200_epochs") is None and fell_back.get("ratio_to_fast_path") is None
    fit = by_variant["lightning fit"]
    assert fit["images_per_s"] > 0 and fit["dataset"] == "synthetic100" and fit["eval_images_per_s"] > 0
    assert fit["minutes_200_epochs"] == pytest.approx(
        train.projected_minutes(fit["images_per_s"], fit["eval_images_per_s"])
    )
    assert all(r.get("minutes_200_epochs") is None for v, r in by_variant.items() if not v.startswith("lightning fit"))
    assert by_variant["lightning fit, whole epoch (record)"].get("minutes_200_epochs") is None
    fast = by_variant["fast path"]["images_per_s"]
    for variant in ("fast path, precision bf16-mixed", "fast path, channels_last off", "fast path, fused SGD on"):
        assert by_variant[variant]["ratio_to_fast_path"] == pytest.approx(by_variant[variant]["images_per_s"] / fast)
    assert failed["ratio_to_fast_path"] is None and by_variant["fast path"].get("ratio_to_fast_path") is None


def test_the_fast_path_is_what_a_run_uses_and_each_gpu_lever_is_flipped_alone():
    assert FastPath.for_device(CPU) == FastPath(
        precision="32-true", channels_last=True, cudnn_benchmark=False, fused_sgd=False
    )
    gpu = torch.device("cuda")
    fast = FastPath(precision="bf16-mixed", channels_last=True, cudnn_benchmark=True, fused_sgd=True)
    flipped = dict(train.levers(fast, gpu))
    assert list(flipped) == [
        "precision 32-true",
        "channels_last off",
        "fused SGD off",
        "cudnn.benchmark off",
        "precision 16-mixed (gradient scaler)",
    ]
    for label, variant in flipped.items():
        changed = {
            f
            for f in ("precision", "channels_last", "cudnn_benchmark", "fused_sgd")
            if getattr(variant, f) != getattr(fast, f)
        }
        assert len(changed) == 1, label
    assert [label for label, _ in train.compile_modes(gpu)] == ["torch.compile", "torch.compile, CUDA graphs"]
    assert dict(train.compile_modes(gpu))["torch.compile, CUDA graphs"] == "reduce-overhead"


def test_projected_minutes_of_a_200_epoch_run():
    # 50,000 training images at 10,000/s and 10,000 test images at 20,000/s: 5.5 s an epoch, 200 epochs
    assert train.projected_minutes(10_000, 20_000) == pytest.approx(200 * 5.5 / 60)


def test_rows_are_written_with_the_bench_schema_each_as_it_is_added(tmp_path):
    row = {
        "what": "pipeline",
        "variant": "device loader",
        "baseline": True,
        "images_per_s": 10.0,
        "ratio": 1.0,
        "device": "cpu",
        "torch_version": torch.__version__,
    }
    table = rows.Table(tmp_path)
    table.add(row)
    path = table.path
    assert path.parent == tmp_path / "bench" and path.suffix == ".parquet"
    written = pq.read_table(path)
    assert written.schema.equals(rows.SCHEMA) and written.schema.metadata[b"cifarbench.schema"] == b"bench/4"
    assert not records.is_record_schema(written.schema) and records.read_record(path) is None
    assert written.to_pylist()[0]["images_per_s"] == 10.0 and written.to_pylist()[0]["model"] is None
    table.add({**row, "variant": "second", "baseline": False})
    assert [r["variant"] for r in pq.read_table(path).to_pylist()] == ["device loader", "second"]
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # rewritten in place, no temporary file left


def test_a_benchmark_cut_off_keeps_the_rows_it_had_measured(synthetic_root, tmp_path):
    # the GPU check kills a part at its cap: whatever was measured before the kill is on disk
    table = rows.Table(tmp_path)
    measured = pipeline.bench_pipeline(dataset="synthetic10", root=synthetic_root, batch_size=32, device=CPU, **TINY)
    table.add(next(measured))
    measured.close()  # stopped after its first row
    (row,) = pq.read_table(table.path).to_pylist()
    assert row["baseline"] and row["loader"] == "torchvision" and row["images_per_s"] > 0


def test_missing_synthetic_data_is_written_and_real_data_never_downloaded(tmp_path):
    assert pipeline.prepare_data("synthetic10", tmp_path, train_size=20, test_size=10) is True
    assert pipeline.prepare_data("synthetic10", tmp_path) is False
    with pytest.raises(UsageError, match="cifarbench data download"):
        pipeline.prepare_data("cifar10", tmp_path)
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_bench_command_prints_a_table_and_writes_parquet(synthetic_root, tmp_path, capsys):
    code = main(
        [
            "bench",
            "--what",
            "pipeline",
            "--dataset",
            "synthetic10",
            "--data-root",
            str(synthetic_root),
            "--batch-size",
            "32",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--repeats",
            "1",
            "--results",
            str(tmp_path),
        ]
    )
    assert code == 0
    out, err = capsys.readouterr()
    header, *lines = out.strip().splitlines()
    assert header.split()[:9] == ["what", "variant", "images/s", "x", "baseline", "x", "fast", "200", "ep"]
    assert lines[-1].startswith("pipeline  device loader") and f"cpu / {torch.__version__}" in lines[-1]
    assert len(lines) == len(pipeline.baseline_workers()) + 1
    (path,) = (tmp_path / "bench").glob("*.parquet")
    assert f"wrote {path}" in err and pq.read_table(path).num_rows == len(lines)


def test_bench_command_refuses_to_download(tmp_path, capsys):
    assert main(["bench", "--dataset", "cifar10", "--data-root", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "dataset cifar10 not found" in err and "cifarbench data download" in err


def test_bench_command_rejects_a_bad_model_or_precision_before_measuring(synthetic_root, tmp_path, capsys):
    args = ["bench", "--dataset", "synthetic10", "--data-root", str(synthetic_root), "--results", str(tmp_path)]
    assert main(args + ["--model", "resnet21"]) == 2
    assert "unknown model 'resnet21' (did you mean 'resnet32'?)" in capsys.readouterr().err
    if not torch.cuda.is_available():
        assert main(args + ["--precision", "16-mixed"]) == 2
        assert "16-mixed needs a GPU" in capsys.readouterr().err
    assert not (tmp_path / "bench").exists()


@pytest.mark.parametrize("packs", ["0", "-1", "two", "1,,2"])
def test_bench_pack_rejects_a_bad_pack_list_before_measuring(synthetic_root, tmp_path, capsys, packs):
    args = ["bench", "--what", "pack", "--pack", packs, "--dataset", "synthetic10", "--data-root", str(synthetic_root)]
    assert main(args + ["--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "argument --pack: must be an integer >= 1" in err
    assert not (tmp_path / "bench").exists()


@pytest.mark.slow
@pytest.mark.extended
def test_bench_pack_measures_runs_at_once_against_one_alone(synthetic_root, tmp_path, capsys):
    args = ["bench", "--what", "pack", "--pack", "2", "--isolation", "--model", "resnet20", "--dataset", "synthetic10"]
    args += ["--data-root", str(synthetic_root), "--batch-size", "32", "--steps", "2", "--warmup", "1"]
    assert main(args + ["--repeats", "2", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[-1] == "peak: resident memory (RSS), summed over the runs"
    (path,) = (tmp_path / "bench").glob("*.parquet")
    rows = pq.read_table(path).to_pylist()
    assert [(r["what"], r["pack"], r["baseline"]) for r in rows] == [
        ("pack", 1, True),
        ("pack", 2, False),
        ("isolation", 2, False),
    ]
    alone, packed, isolated = rows
    # run 0 failed (a labelled stand-in on a CPU), the other ran its timed windows
    assert isolated["failed_runs"] == 1 and isolated["images_per_s"] > 0
    assert isolated["note"].startswith(f"run 0: RuntimeError: {pack.CPU_STAND_IN}; failed: run 0; 1 of 1 others")
    assert alone["ratio"] == pytest.approx(1.0) and alone["slowdown"] == pytest.approx(1.0)
    assert packed["ratio"] == pytest.approx(packed["images_per_s"] / alone["images_per_s"])
    assert packed["slowdown"] == pytest.approx(alone["per_run_images_per_s"] / packed["per_run_images_per_s"])
    for row in (alone, packed):  # the median of 2 windows of the runs together, between the slowest and fastest
        assert row["images_per_s_min"] <= row["images_per_s"] <= row["images_per_s_max"]
    threads = max(usable_cores() // 2, 1)
    assert (alone["torch_threads"], packed["torch_threads"]) == (usable_cores(), threads)
    assert all(r["peak_memory_mb"] > 0 and r["images_per_s"] > 0 for r in rows)
    assert packed["peak_memory_mb"] > alone["peak_memory_mb"]  # two processes' memory, summed


def _ddp_reports(world: int, seconds: float) -> list[dict]:
    return [
        {"index": r, "windows": [(0.0, seconds, 64), (0.0, seconds, 64)], "precision": "32-true"} for r in range(world)
    ]


def test_ddp_rows_give_the_scaling_efficiency(monkeypatch):
    from cifarbench.bench import ddp

    # one process takes 1 s a window, two take 0.8 s: 1.25x one process, an efficiency of 0.625
    monkeypatch.setattr(ddp, "_run", lambda task: _ddp_reports(task["world"], 1.0 if task["world"] == 1 else 0.8))
    one, two = ddp.bench_ddp(model="resnet20", dataset="synthetic10", root="/nowhere", batch_size=64, device=CPU)
    assert (one["variant"], one["baseline"], one["processes"], one["images_per_s"]) == ("1 process", True, 1, 64.0)
    assert (two["processes"], two["ratio"], two["efficiency"]) == (2, pytest.approx(1.25), pytest.approx(0.625))
    assert two["note"].startswith("global batch 64 (32 per rank)") and set(two) <= set(rows.SCHEMA.names)
    assert "scaling efficiency 0.62" in rows.render([one, two])


def test_ddp_on_one_gpu_says_it_measured_nothing(monkeypatch):
    from cifarbench.bench import ddp

    ran = []
    monkeypatch.setattr(ddp, "_run", lambda task: ran.append(task["world"]) or _ddp_reports(task["world"], 1.0))
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA H200")
    gpu = torch.device("cuda")
    one, two = ddp.bench_ddp(model="resnet20", dataset="synthetic10", root="/nowhere", batch_size=64, device=gpu)
    assert ran == [1] and one["images_per_s"] == 64.0  # the second process was never started
    assert two.get("images_per_s") is None and two.get("efficiency") is None
    assert two["note"] == "measured nothing: this machine has 1 GPU, and 2 processes need one each"
    table = rows.render([one, two])  # the command prints it: a row without a rate shows "-"
    assert table.splitlines()[2].split()[:4] == ["ddp", "2", "processes", "-"] and "measured nothing" in table


def test_bench_ddp_refuses_what_it_cannot_measure(synthetic_root, tmp_path, capsys):
    common = ["bench", "--what", "ddp", "--data-root", str(synthetic_root), "--results", str(tmp_path)]
    assert main([*common, "--processes", "1"]) == 2
    assert main([*common, "--processes", "3"]) == 2  # batch 64 does not divide by 3
    err = capsys.readouterr().err
    assert "--processes: 1" in err and "--batch-size 64 does not divide among 3 processes" in err


def test_timed_batches_leave_out_each_epochs_short_last_batch():
    # 10 images in batches of 4: 4, 4, then a short 2 that would make cudnn.benchmark tune inside a timed window
    class Loader:
        sampler = None

        def __iter__(self):
            for n in (4, 4, 2):
                yield torch.zeros(n, 3), torch.zeros(n)

    stream = timing.batches(Loader())
    assert [len(next(stream)[1]) for _ in range(5)] == [4, 4, 4, 4, 4]
