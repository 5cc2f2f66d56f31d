"""Frozen run specs: what one run is, the optimisation recipes, and the stable run id."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from cifarbench.models import MODELS, check_name

# Bump when the meaning of a spec field changes: every run id changes with it.
SPEC_VERSION = 1

DATASETS = {"cifar10": 10, "cifar100": 100, "synthetic10": 10, "synthetic100": 100}
LOADERS = ("device", "torchvision")
PRECISIONS = ("auto", "32-true", "16-mixed", "bf16-mixed")
SCHEDULES = ("step", "cos")


@dataclass(frozen=True, kw_only=True)
class Recipe:
    """SGD with momentum and an epoch-wise LR schedule ("step": MultiStepLR, "cos": CosineAnnealingLR)."""

    name: str
    epochs: int
    lr: float = 0.1
    momentum: float = 0.9
    weight_decay: float
    schedule: str
    milestones: tuple[int, ...] = ()
    gamma: float = 0.1

    def __post_init__(self):
        check_name(self.schedule, SCHEDULES, "schedule")
        if self.epochs < 1:
            raise ValueError(f"recipe {self.name!r}: epochs must be >= 1, got {self.epochs}")
        object.__setattr__(self, "milestones", tuple(int(m) for m in self.milestones))

    def shortened(self, epochs: int) -> "Recipe":
        """The same recipe over ``epochs`` epochs: milestones (and T_max, which is ``epochs``) scale
        proportionally, rounded, so a 2-epoch smoke run keeps the shape of the 200-epoch schedule."""
        if epochs == self.epochs:
            return self
        scale = epochs / self.epochs
        milestones = tuple(sorted({max(1, round(m * scale)) for m in self.milestones}))
        return dataclasses.replace(self, epochs=epochs, milestones=milestones)


RECIPES: dict[str, Recipe] = {
    r.name: r
    for r in (
        Recipe(name="step-160", epochs=160, weight_decay=1e-4, schedule="step", milestones=(80, 120), gamma=0.1),
        Recipe(name="step-200", epochs=200, weight_decay=5e-4, schedule="step", milestones=(60, 120, 160), gamma=0.2),
        Recipe(name="cos-200", epochs=200, weight_decay=5e-4, schedule="cos"),
    )
}


def get_recipe(name: str) -> Recipe:
    return RECIPES[check_name(name, RECIPES, "recipe")]


@dataclass(frozen=True, kw_only=True)
class RunSpec:
    """One run: everything that decides its result, plus where its data and results live."""

    model: str
    dataset: str
    recipe: Recipe
    batch_size: int
    seed: int
    epochs: int | None = None  # None: the recipe's own length
    precision: str = "auto"
    loader: str = "device"
    deterministic: bool = False
    data_root: str = "data"
    verify: bool = True
    results: str = "results"
    # Not part of the run id: bookkeeping that never changes the numbers.
    _id_excluded = ("data_root", "verify", "results")

    def __post_init__(self):
        check_name(self.model, MODELS, "model")
        check_name(self.dataset, DATASETS, "dataset")
        check_name(self.loader, LOADERS, "loader")
        check_name(self.precision, PRECISIONS, "precision")
        for key in ("batch_size", "epochs"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed must be an integer in [0, 2**32), got {self.seed!r}")

    @property
    def num_classes(self) -> int:
        return DATASETS[self.dataset]

    @property
    def schedule(self) -> Recipe:
        """The recipe as it is actually run (shortened when ``epochs`` overrides it)."""
        return self.recipe.shortened(self.epochs) if self.epochs else self.recipe

    def identity(self) -> dict:
        """The fields that change the result, as plain JSON-able values."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in self._id_excluded}
        fields["recipe"] = dataclasses.asdict(self.recipe)
        fields["recipe"]["milestones"] = list(self.recipe.milestones)
        return {"spec_version": SPEC_VERSION, **fields}

    @property
    def run_id(self) -> str:
        blob = json.dumps(self.identity(), sort_keys=True, separators=(",", ":"))
        return f"{self.model}-{self.dataset}-v{SPEC_VERSION}-{hashlib.sha256(blob.encode()).hexdigest()[:12]}"

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        d["recipe"]["milestones"] = list(self.recipe.milestones)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "RunSpec":
        d = dict(d)
        d["recipe"] = Recipe(**d["recipe"])
        return cls(**d)
