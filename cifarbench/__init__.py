"""cifarbench: CIFAR ResNet benchmarks on SLURM."""

__version__ = "0.1.0"
