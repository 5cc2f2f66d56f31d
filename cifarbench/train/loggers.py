"""A grid's ``logger:``: one of Lightning's own loggers, writing under the run's folder (``runs/<run_id>/loggers``).

The record stays the source of truth; a logger only shows the curves live in a tool people already use. Each
logs what the record keeps per epoch (losses, accuracy, learning rate, epoch seconds, images/s), at the epoch as
step, so a requeued run that resumes from its checkpoint goes on where it stopped."""

from __future__ import annotations

import os

from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from cifarbench.config.spec import RunSpec
from cifarbench.store.layout import Layout


def make_logger(spec: RunSpec) -> Logger | None:
    if spec.logger is None:
        return None
    folder = Layout(spec.results).loggers(spec.run_id)
    folder.mkdir(parents=True, exist_ok=True)
    if spec.logger == "tensorboard":
        return TensorBoardLogger(save_dir=folder, name="tensorboard", version="", default_hp_metric=False)
    if spec.logger == "csv":
        return CSVLogger(save_dir=folder, name="csv", version="")
    if spec.logger == "wandb":
        import wandb

        # one run per run id: a resumed attempt appends to it. Started here rather than by the logger, which would
        # reuse the process's current run: a fused group's members each log to their own.
        run = wandb.init(
            dir=str(folder),
            mode="offline",
            project="cifarbench",
            name=spec.run_id,
            id=spec.run_id,
            resume="allow",
            reinit="create_new",
        )
        return WandbLogger(experiment=run, save_dir=str(folder), offline=True)
    if spec.logger == "mlflow":
        # MLflow 3 refuses its file store unless asked for it: a folder beside the run needs no database or server
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return MLFlowLogger(
            experiment_name="cifarbench", run_name=spec.run_id, tracking_uri=(folder / "mlruns").resolve().as_uri()
        )
    raise ValueError(f"unknown logger {spec.logger!r}")  # RunSpec checks the name: not reached
