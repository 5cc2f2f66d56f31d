"""Torch-free control plane: submitting job arrays (or local jobs), asking SLURM about them, run status."""
