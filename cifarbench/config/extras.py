"""Optional extras (``pip install 'cifarbench[tensorboard]'``): what each needs, asked of the installed packages
without importing them, so that ``submit`` refuses a grid whose logger cannot run before anything is queued."""

from __future__ import annotations

import importlib.util

# logger -> (the module it needs, the extra that installs it); csv is Lightning's own CSVLogger
LOGGER_EXTRAS = {
    "tensorboard": ("tensorboard", "tensorboard"),
    "wandb": ("wandb", "wandb"),
    "mlflow": ("mlflow", "mlflow"),
}


def missing_logger(logger: str | None) -> str | None:
    """Why ``logger`` cannot run here (one line), or None when it can."""
    if logger not in LOGGER_EXTRAS:
        return None
    module, extra = LOGGER_EXTRAS[logger]
    if importlib.util.find_spec(module) is not None:
        return None
    return (
        f"logger: {logger} needs the {module} package, which is not installed; "
        f"pip install 'cifarbench[{extra}]', or remove `logger:` from the grid"
    )
