"""The fast path must not move accuracy: the device loader and the torchvision baseline loader train to the same
test accuracy on synthetic data, within the run-to-run noise measured for this setup."""

import contextlib
import io
import statistics

import pytest
import torch

from cifarbench import records, train
from cifarbench.spec import RunSpec, get_recipe

SEEDS = range(4)
# Measured for this setup (resnet20, synthetic10 1000/500, 5 epochs, batch 64, CPU), seeds 0-9 per loader:
# device loader final accuracies 0.82-1.00 (median 0.990), torchvision 0.972-0.996 (median 0.992). Over every
# split of those 20 outcomes into two groups of 4, the medians differ by at most 0.043.
TOLERANCE = 0.05


@pytest.mark.slow
def test_fast_and_baseline_loaders_reach_the_same_accuracy(synthetic_root, tmp_path):
    accuracy = {}
    for loader in ("device", "torchvision"):
        for seed in SEEDS:
            spec = RunSpec(model="resnet20", dataset="synthetic10", recipe=get_recipe("step-200"), batch_size=64,
                           seed=seed, epochs=5, loader=loader, deterministic=True, data_root=str(synthetic_root),
                           results=str(tmp_path))
            with contextlib.redirect_stdout(io.StringIO()):
                record = records.read_record(train.fit(spec, device=torch.device("cpu")))
            assert record["status"] == "completed" and record["loader"] == loader
            accuracy.setdefault(loader, []).append(record["final_test_acc"])
    fast, base = (statistics.median(accuracy[k]) for k in ("device", "torchvision"))
    assert fast > 0.9 and base > 0.9, accuracy  # both learned (chance is 0.1)
    assert abs(fast - base) <= TOLERANCE, accuracy
