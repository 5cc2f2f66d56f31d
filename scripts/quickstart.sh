#!/usr/bin/env bash
# End to end on this machine: install, write a small synthetic CIFAR-10 in the real layout, run the smoke grid
# (on SLURM when sbatch is available, otherwise locally) and wait for it, then print the benchmark tables.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PWD/.venv/bin:$PATH"
cifarbench data synthetic --root data --dataset synthetic10 --train-size 1000 --test-size 200
cifarbench submit jobs/smoke.yaml --wait
cifarbench collect results
