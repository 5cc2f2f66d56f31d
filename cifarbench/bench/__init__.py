"""Measurements of the training layer's code paths (``cifarbench bench``), one module per benchmark:

- ``pipeline``: the input pipeline, the device loader against torchvision's DataLoader;
- ``train``: training steps, the notebook's baseline against the fast path, each lever and torch.compile;
- ``pack``: K runs packed onto one device, each in a process of its own, against one run alone;
- ``fuse``: a fused group of K runs (one module, K members) against one unfused run;

with what they share: ``timing`` (synchronise, warm up, the median of repeated windows and their spread) and
``rows`` (the table's schema, the columns every row carries, the table written as each row is measured, and
its plain-text rendering). Nothing below this package imports it; the command line sits above it.
"""
