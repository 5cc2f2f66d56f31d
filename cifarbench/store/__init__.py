"""Torch-free storage: the results folder's layout, atomic writes, records, manifests, locks and progress."""
