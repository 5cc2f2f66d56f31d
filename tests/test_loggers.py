"""A grid's `logger:`: Lightning's own loggers write under the run's folder; off by default, never in the run id."""

import csv

import pytest

from cifarbench.cli import main
from cifarbench.config.extras import missing_logger
from cifarbench.config.grid import parse_grid
from cifarbench.config.spec import LOGGERS, RunSpec, get_recipe
from cifarbench.errors import GridError
from cifarbench.store import records
from cifarbench.store.layout import Layout

GRID = "models: [resnet20]\ndatasets: [synthetic10]\nopts: [step-200]\nbatch_sizes: [64]\n"


def spec(root, results, logger=None) -> RunSpec:
    return RunSpec(
        model="resnet20",
        dataset="synthetic10",
        recipe=get_recipe("step-200"),
        batch_size=128,
        seed=0,
        epochs=1,
        data_root=str(root),
        results=str(results),
        logger=logger,
    )


def test_a_logger_never_changes_the_run_id(tmp_path):
    assert {spec(tmp_path, tmp_path, logger).run_id for logger in (None, *LOGGERS)} == {spec(tmp_path, tmp_path).run_id}
    assert parse_grid(GRID + "logger: csv\n").specs[0].run_id == parse_grid(GRID).specs[0].run_id
    assert parse_grid(GRID + "logger: csv\n").specs[0].logger == "csv" and parse_grid(GRID).specs[0].logger is None
    with pytest.raises(GridError, match="logger: unknown logger 'tensorbord' \\(did you mean 'tensorboard'\\?\\)"):
        parse_grid(GRID + "logger: tensorbord\n")


def test_a_logger_whose_extra_is_missing_is_one_line_at_submit(tmp_path, capsys):
    absent = next((name for name in LOGGERS if missing_logger(name)), None)
    if absent is None:
        pytest.skip("every logger's extra is installed here")
    grid = tmp_path / "grid.yaml"
    grid.write_text(GRID + f"logger: {absent}\nresults: {tmp_path / 'results'}\n")
    assert main(["submit", str(grid), "--executor", "local"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"cifarbench: error: {missing_logger(absent)}" and f"cifarbench[{absent}]" in err
    assert not (tmp_path / "results").exists()  # nothing submitted
    assert missing_logger("csv") is None and missing_logger(None) is None


def _written(folder, logger):
    """The files a logger's own tools read, under the run's loggers/ folder."""
    return {
        "tensorboard": lambda: list(folder.glob("tensorboard/events.out.tfevents.*")),
        "csv": lambda: list(folder.glob("csv/metrics.csv")),
        "wandb": lambda: list(folder.glob("wandb/offline-run-*")),
        "mlflow": lambda: list(folder.glob("mlruns/*/*/metrics/test_acc")),
    }[logger]()


@pytest.mark.slow
@pytest.mark.parametrize("logger", LOGGERS)
def test_each_logger_writes_its_files_for_a_one_epoch_run(synthetic_root, tmp_path, logger, monkeypatch):
    if why := missing_logger(logger):
        pytest.skip(why)
    from cifarbench.train.fit import fit

    monkeypatch.setenv("WANDB_MODE", "offline")  # never the network, whatever the machine's settings
    run = spec(synthetic_root, tmp_path, logger)
    record = records.read_record(fit(run))
    assert record["status"] == "completed" and record["run_id"] == spec(synthetic_root, tmp_path).run_id
    folder = Layout(tmp_path).loggers(run.run_id)
    assert _written(folder, logger), sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))
    if logger == "csv":
        [row] = list(csv.DictReader((folder / "csv" / "metrics.csv").open()))
        assert float(row["test_acc"]) == pytest.approx(record["final_test_acc"]) and row["step"] == "1"
