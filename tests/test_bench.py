import pyarrow.parquet as pq
import pytest
import torch

from cifarbench import bench, records
from cifarbench.cli import main
from cifarbench.errors import UsageError

CPU = torch.device("cpu")
TINY = dict(steps=2, warmup=1, repeats=2)


def _check_rows(rows, what):
    base = [r for r in rows if r["baseline"]]
    assert len(base) == 1 and base[0]["ratio"] == pytest.approx(1.0)
    for r in rows:
        assert r["what"] == what and set(r) <= set(bench.SCHEMA.names)
        assert r["device"] == "cpu" and r["torch_version"] == torch.__version__
        assert r["cpu_cores"] == bench.usable_cores() and r["torch_threads"] == torch.get_num_threads()
        if r["images_per_s"] is not None:
            assert r["images_per_s"] > 0
            assert r["ratio"] == pytest.approx(r["images_per_s"] / base[0]["images_per_s"])


def test_pipeline_rows_compare_the_device_loader_with_the_dataloader_on_all_cores(synthetic_root):
    rows = bench.bench_pipeline(dataset="synthetic10", root=synthetic_root, batch_size=32, device=CPU, **TINY)
    _check_rows(rows, "pipeline")
    assert rows[0]["baseline"] and rows[0]["loader"] == "torchvision" and rows[0]["workers"] == bench.usable_cores()
    assert [r["workers"] for r in rows[:-1]] == bench.baseline_workers()
    assert rows[-1]["variant"] == "device loader" and rows[-1]["loader"] == "device"
    assert all(r["dataset"] == "synthetic10" and r["batch_size"] == 32 and r["steps"] == 2 for r in rows)


def test_train_rows_cover_baseline_fast_path_and_lightning_fit(synthetic_root, monkeypatch):
    def broken_compile(model):
        def run(x):
            raise RuntimeError("no compiler\nsecond line")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    rows = bench.bench_train(model="resnet20", dataset="synthetic100", root=synthetic_root, batch_size=8,
                             device=CPU, compile=True, steps=1, warmup=1, repeats=1)
    _check_rows(rows, "train")
    by_variant = {r["variant"]: r for r in rows}
    assert list(by_variant) == ["baseline: PIL DataLoader, eager", "fast path", "fast path + torch.compile",
                                "lightning fit", "lightning fit, whole epoch (record)"]
    assert by_variant["baseline: PIL DataLoader, eager"]["workers"] == bench.usable_cores()
    assert all(r["precision"] == "32-true" and r["model"] == "resnet20" for r in rows)
    failed = by_variant["fast path + torch.compile"]
    assert failed["images_per_s"] is None and failed["ratio"] is None
    assert failed["note"] == "torch.compile failed: RuntimeError: no compiler"
    assert by_variant["lightning fit"]["images_per_s"] > 0 and by_variant["lightning fit"]["dataset"] == "synthetic100"


def test_rows_are_written_with_the_bench_schema(tmp_path):
    rows = [{"what": "pipeline", "variant": "device loader", "baseline": True, "images_per_s": 10.0, "ratio": 1.0,
             "device": "cpu", "torch_version": torch.__version__}]
    path = bench.write_rows(rows, tmp_path)
    assert path.parent == tmp_path / "bench" and path.suffix == ".parquet"
    table = pq.read_table(path)
    assert table.schema.equals(bench.SCHEMA) and table.schema.metadata[b"cifarbench.schema"] == b"bench/1"
    assert not records.is_record_schema(table.schema) and records.read_record(path) is None
    assert table.to_pylist()[0]["images_per_s"] == 10.0 and table.to_pylist()[0]["model"] is None


def test_missing_synthetic_data_is_written_and_real_data_never_downloaded(tmp_path):
    assert bench.prepare_data("synthetic10", tmp_path, train_size=20, test_size=10) is True
    assert bench.prepare_data("synthetic10", tmp_path) is False
    with pytest.raises(UsageError, match="cifarbench data download"):
        bench.prepare_data("cifar10", tmp_path)
    assert not (tmp_path / "cifar-10-batches-py").exists()


def test_bench_command_prints_a_table_and_writes_parquet(synthetic_root, tmp_path, capsys):
    code = main(["bench", "--what", "pipeline", "--dataset", "synthetic10", "--data-root", str(synthetic_root),
                 "--batch-size", "32", "--steps", "2", "--warmup", "1", "--repeats", "1",
                 "--results", str(tmp_path)])
    assert code == 0
    out, err = capsys.readouterr()
    header, *lines = out.strip().splitlines()
    assert header.split()[:4] == ["what", "variant", "images/s", "x"]
    assert lines[-1].startswith("pipeline  device loader") and f"cpu / {torch.__version__}" in lines[-1]
    assert len(lines) == len(bench.baseline_workers()) + 1
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
