"""Torch-free configuration: run specs and the run id, SLURM resources, grid files."""
