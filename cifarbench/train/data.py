"""CIFAR-10/100 and their synthetic stand-ins in the standard on-disk layout, and the two training loaders.

Every dataset is read by torchvision's own CIFAR reader from the python-pickle layout
(``cifar-10-batches-py/``, ``cifar-100-python/``). Synthetic copies live in ``<root>/synthetic10/`` and
``<root>/synthetic100/`` in exactly that layout, with an ``MD5SUMS`` file that plays the role of
torchvision's built-in checksums. Where the files are and the check that they are intact are in
``cifarbench.store.datasets``, which needs no torch, so that ``submit`` can check the data before queueing.
"""

from __future__ import annotations

import functools
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Subset
from torchvision import datasets as tvd
from torchvision import transforms

from cifarbench.config.spec import DATASETS
from cifarbench.store.datasets import (
    FILES,
    DataError,
    check_dataset,
    dataset_folder,
    md5,
    missing_message,
    synthetic_sizes,
    val_indices,
)
from cifarbench.system import usable_cores
from cifarbench.train.ddp import rank_slice

MEAN = {10: (0.4914, 0.4822, 0.4465), 100: (0.5071, 0.4867, 0.4408)}
STD = {10: (0.2023, 0.1994, 0.2010), 100: (0.2675, 0.2565, 0.2761)}
PAD = 4


@dataclass(frozen=True)
class _Layout:
    reader: type[tvd.CIFAR10]  # torchvision.datasets.CIFAR10 or CIFAR100 (a subclass of it)
    num_classes: int
    synthetic: bool


LAYOUTS = {
    name: _Layout(tvd.CIFAR10 if d.num_classes == 10 else tvd.CIFAR100, d.num_classes, d.synthetic)
    for name, d in DATASETS.items()
}


def load_split(dataset: str, root: str | Path, *, train: bool, transform=None) -> tvd.CIFAR10:
    """The torchvision dataset for one split; checksums are checked by ``check_dataset``, not here."""
    layout = LAYOUTS[dataset]
    # Files are checked by check_dataset; this subclass only stops torchvision from re-hashing them with its own
    # (real-CIFAR) checksums, which would reject synthetic and re-encoded copies.
    reader = type(
        layout.reader.__name__,
        (layout.reader,),
        {"_check_integrity": lambda self: True, "meta": {**layout.reader.meta, "md5": None}},
    )
    try:
        # torchvision's root is the folder that holds its base folder
        return reader(str(dataset_folder(dataset, root).parent), train=train, transform=transform)
    except (pickle.UnpicklingError, EOFError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise DataError(
            f"cannot read {dataset} in {dataset_folder(dataset, root)}: corrupt file ({type(exc).__name__}: "
            f"{exc}); re-create or re-download it"
        ) from None
    except FileNotFoundError:
        raise DataError(missing_message(dataset, root)) from None


def load_arrays(dataset: str, root: str | Path, *, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One split as (uint8 images N x 3 x 32 x 32, int64 labels)."""
    ds = load_split(dataset, root, train=train)
    images = torch.from_numpy(np.ascontiguousarray(ds.data.transpose(0, 3, 1, 2)))
    return images, torch.tensor(ds.targets, dtype=torch.long)


def download(dataset: str, root: str | Path) -> None:
    """Download and checksum-verify a real CIFAR dataset with torchvision (for a login node, not a job)."""
    layout = LAYOUTS[dataset]
    if layout.synthetic:
        raise DataError(f"{dataset} is generated, not downloaded: run `cifarbench data synthetic --root {root}`")
    layout.reader(str(root), train=True, download=True)
    check_dataset(dataset, root, verify=True)


# --- synthetic data -------------------------------------------------------------------------------------------


def _synthetic_images(
    num_classes: int, labels: np.ndarray, rng: np.random.Generator, templates: np.ndarray
) -> np.ndarray:
    """Class template (a smooth colour pattern) + per-image brightness/contrast jitter + pixel noise."""
    n = len(labels)
    contrast = rng.uniform(0.6, 1.2, size=(n, 1, 1, 1)).astype(np.float32)
    brightness = rng.normal(0, 20, size=(n, 1, 1, 1)).astype(np.float32)
    noise = rng.normal(0, 40, size=(n, 3, 32, 32)).astype(np.float32)
    images = 128 + contrast * templates[labels] + brightness + noise
    return np.clip(images, 0, 255).astype(np.uint8).reshape(n, 3 * 32 * 32)


def _templates(num_classes: int, rng: np.random.Generator) -> np.ndarray:
    coarse = torch.from_numpy(rng.normal(0, 1, size=(num_classes, 3, 4, 4)).astype(np.float32))
    smooth = torch.nn.functional.interpolate(coarse, size=(32, 32), mode="bilinear", align_corners=False)
    return (20 * smooth / smooth.std(dim=(1, 2, 3), keepdim=True)).numpy()


def write_synthetic(
    dataset: str,
    root: str | Path,
    *,
    train_size: int = 50_000,
    test_size: int = 10_000,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write a deterministic, learnable synthetic dataset in the exact CIFAR on-disk layout. A dataset of another
    size already there is only replaced with ``force``: runs that trained on it would no longer match their
    data."""
    layout = LAYOUTS[dataset]
    if not layout.synthetic:
        raise DataError(f"{dataset} is a real dataset; synthetic ones are: synthetic10, synthetic100")
    if train_size < 1 or test_size < 1:
        raise DataError("--train-size and --test-size must be positive")
    existing = synthetic_sizes(dataset, root)
    if existing is not None and existing != (train_size, test_size) and not force:
        raise DataError(
            f"{dataset_folder(dataset, root)} already holds {dataset} with {existing[0]} training and {existing[1]} "
            f"test images; pass --force to replace it with {train_size} and {test_size}, or choose another --root"
        )
    k = layout.num_classes
    rng = np.random.default_rng([seed, k])
    templates = _templates(k, rng)
    folder = dataset_folder(dataset, root)
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise DataError(f"cannot write {dataset} to {folder}: {e.strerror}") from None

    def batch(size: int, label: str) -> dict:
        labels = rng.integers(0, k, size=size)
        data = _synthetic_images(k, labels, rng, templates)
        names = [f"synthetic_{label}_{i:06d}.png" for i in range(size)]
        if k == 10:
            return {"batch_label": label, "labels": labels.tolist(), "data": data, "filenames": names}
        return {
            "batch_label": label,
            "fine_labels": labels.tolist(),
            "coarse_labels": (labels // 5).tolist(),
            "data": data,
            "filenames": names,
        }

    files = FILES[dataset].layout
    train_files = [name for name, _ in files.train_list]
    sizes = [train_size // len(train_files) + (i < train_size % len(train_files)) for i in range(len(train_files))]
    contents = {name: batch(size, f"training batch {i + 1}") for i, (name, size) in enumerate(zip(train_files, sizes))}
    contents[files.test_list[0][0]] = batch(test_size, "testing batch")
    names = [f"class_{c:03d}" for c in range(k)]
    contents[files.meta[0]] = (
        {"label_names": names, "num_cases_per_batch": sizes[0], "num_vis": 3072}
        if k == 10
        else {"fine_label_names": names, "coarse_label_names": names[: k // 5]}
    )
    for name, obj in contents.items():
        with open(folder / name, "wb") as fh:
            pickle.dump(obj, fh, protocol=2)
    (folder / "MD5SUMS").write_text("".join(f"{md5(folder / n)}  {n}\n" for n in contents))
    return folder


# --- loaders ---------------------------------------------------------------------------------------------------


class DeviceLoader:
    """A whole split held as one uint8 tensor on the training device, batched with tensor ops.

    Training batches: a permutation drawn from (seed, epoch), then 4-pixel zero padding, a random 32x32 crop and
    a random horizontal flip, each done for the whole batch at once. No worker processes, no host round trips.
    Lightning calls ``sampler.set_epoch`` before each epoch (as for a DistributedSampler), which is how a resumed
    run draws exactly the batches it would have drawn.

    With ``world_size`` > 1 (DDP), every rank draws the permutation and the augmentation's random numbers of the
    whole global batch, exactly as one process does, and yields its contiguous share of it (``ddp.rank_slice``):
    the ranks' shares put together are the single-process batches. Evaluation loaders yield the whole split on
    every rank: with the same weights (and global BatchNorm statistics) every rank computes the single-process
    figures themselves, with no split to pad or sums to gather."""

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        *,
        num_classes: int,
        batch_size: int,
        train: bool,
        seed: int = 0,
        device: torch.device | str = "cpu",
        memory_format: torch.memory_format = torch.contiguous_format,
        rank: int = 0,
        world_size: int = 1,
    ):
        self.device = torch.device(device)
        self.train, self.batch_size, self.seed, self.epoch = train, batch_size, seed, 0
        self.rank, self.world_size = rank, world_size
        self.memory_format = memory_format
        self.labels = labels.to(self.device)
        images = images.to(self.device)
        # Pad once, in pixel space, so the border is black exactly as RandomCrop(padding=4) makes it. Kept in the
        # training memory format, so that batches come out in it without another copy.
        images = torch.nn.functional.pad(images, (PAD,) * 4) if train else images
        self.images = images.contiguous(memory_format=memory_format)
        # Per-pixel copies in the batches' memory format: broadcasting a (1, 3, 1, 1) tensor over a channels_last
        # batch runs 7x slower on CPU (an innermost dimension of 3) than broadcasting these over the batch only.
        self.mean, self.std = (
            (torch.tensor(v[num_classes], device=self.device).view(1, 3, 1, 1) * 255)
            .expand(1, 3, 32, 32)
            .contiguous(memory_format=memory_format)
            for v in (MEAN, STD)
        )
        self.sampler = self
        self.batch_sampler = None  # Lightning inspects both, DataLoader-style
        if train:
            self._runs, self._run_starts = _crop_runs(self.images, channels_last=memory_format is torch.channels_last)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return -(-len(self.labels) // self.batch_size)

    def global_batch(self, index: int) -> int:
        """The images of batch ``index`` of an epoch, all ranks together."""
        return min(self.batch_size, len(self.labels) - index * self.batch_size)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float().sub_(self.mean).div_(self.std)
        return x.contiguous(memory_format=self.memory_format)

    def augment(self, idx: torch.Tensor, generator: torch.Generator, part: slice = slice(None)) -> torch.Tensor:
        """Crop and flip the padded images ``idx[part]`` (uint8 in, uint8 out), with the random numbers drawn for
        the whole of ``idx``."""
        n = len(idx)
        dy = torch.randint(0, 2 * PAD + 1, (n,), device=self.device, generator=generator)[part]
        dx = torch.randint(0, 2 * PAD + 1, (n,), device=self.device, generator=generator)[part]
        flip = torch.rand((n,), device=self.device, generator=generator)[part] < 0.5
        idx = idx[part]
        n = len(idx)
        stride_n, _, stride_h, stride_w = self.images.stride()
        first = idx * stride_n + dy * stride_h + dx * stride_w  # where each crop starts in the storage
        crops = self._runs.index_select(0, (first.view(n, 1) + self._run_starts).flatten())
        if self.memory_format is torch.channels_last:
            crops = crops.view(n, 32, 32, 3).permute(0, 3, 1, 2)
        else:
            crops = crops.view(n, 3, 32, 32)
        # torch.where(flip, crops.flip(3), crops) as a byte mask: the same result, several times faster on CPU.
        mask = flip.to(torch.uint8).mul_(255).view(n, 1, 1, 1)
        return crops.flip(3).bitwise_xor_(crops).bitwise_and_(mask).bitwise_xor_(crops)

    def __iter__(self):
        n = len(self.labels)
        if not self.train:
            for start in range(0, n, self.batch_size):
                yield (
                    self._normalise(self.images[start : start + self.batch_size]),
                    self.labels[start : start + self.batch_size],
                )
            return
        generator = torch.Generator(device=self.device)
        generator.manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(n, device=self.device, generator=generator)
        for start in range(0, n, self.batch_size):
            idx = order[start : start + self.batch_size]
            part = rank_slice(len(idx), self.rank, self.world_size)
            yield self._normalise(self.augment(idx, generator, part)), self.labels[idx[part]]


def _crop_runs(padded: torch.Tensor, *, channels_last: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """A 32x32 crop of a padded image is a few runs of consecutive bytes in storage: one per channel and row
    (32 pixels) in NCHW, one per row (32 pixels x 3 channels) in NHWC. Returns ``runs``, a view of the whole
    storage whose row k is the run starting at element k, and the runs' starts relative to the crop's first
    element, so that a batch of crops is one ``index_select``: about 100x faster on CPU than indexing with one
    index per pixel."""
    _, channels, _, _ = padded.shape
    _, stride_c, stride_h, _ = padded.stride()
    rows = torch.arange(32, device=padded.device) * stride_h
    if channels_last:
        length, starts = 32 * channels, rows
    else:
        length = 32
        starts = (torch.arange(channels, device=padded.device).view(-1, 1) * stride_c + rows).flatten()
    return padded.as_strided((padded.numel() - length + 1, length), (1, 1)), starts


def torchvision_transforms(num_classes: int, *, train: bool) -> transforms.Compose:
    """The per-image PIL pipeline of the usual CIFAR recipe (the baseline loader)."""
    steps = [transforms.RandomCrop(32, padding=PAD), transforms.RandomHorizontalFlip()] if train else []
    return transforms.Compose(
        steps + [transforms.ToTensor(), transforms.Normalize(MEAN[num_classes], STD[num_classes])]
    )


class Loaders(NamedTuple):
    train: Any
    test: Any
    val: Any  # None without a validation split
    sizes: dict[str, int]  # images in each split: train_images, val_images, test_images


def make_loaders(**kwargs):
    """(train, test) iterables of normalised batches for ``loader`` = "device" or "torchvision"."""
    loaders = make_run_loaders(**kwargs)
    return loaders.train, loaders.test


def make_run_loaders(
    *,
    dataset: str,
    root: str | Path,
    loader: str,
    batch_size: int,
    seed: int,
    device: torch.device | str = "cpu",
    num_workers: int | None = None,
    memory_format: torch.memory_format = torch.contiguous_format,
    eval_batch_size: int = 1000,
    val_split: int = 0,
    rank: int = 0,
    world_size: int = 1,
) -> Loaders:
    """The training, test and (with ``val_split`` images held out of the training set) validation loaders; with
    ``world_size`` > 1, rank ``rank``'s share of each training batch (the device loader only)."""
    k = LAYOUTS[dataset].num_classes
    train: Any
    test: Any
    val: Any
    if loader == "device":
        images, labels = load_arrays(dataset, root, train=True)
        test_images, test_labels = load_arrays(dataset, root, train=False)
        held = None
        if val_split:
            val_idx = torch.tensor(val_indices(len(labels), val_split))
            keep = torch.ones(len(labels), dtype=torch.bool)
            keep[val_idx] = False
            held = (images[val_idx], labels[val_idx])
            images, labels = images[keep], labels[keep]
        device_loader = functools.partial(
            DeviceLoader, num_classes=k, device=device, memory_format=memory_format, batch_size=eval_batch_size
        )
        train = device_loader(
            images, labels, train=True, seed=seed, batch_size=batch_size, rank=rank, world_size=world_size
        )
        test = device_loader(test_images, test_labels, train=False)
        val = device_loader(*held, train=False) if held else None
        sizes = (len(labels), len(held[1]) if held else 0, len(test_labels))
    else:
        assert world_size == 1, "RunSpec refuses loader: torchvision on several devices"
        workers = usable_cores() if num_workers is None else num_workers
        common: dict[str, Any] = dict(
            num_workers=workers, pin_memory=torch.device(device).type == "cuda", persistent_workers=workers > 0
        )
        train_ds: Any = load_split(dataset, root, train=True, transform=torchvision_transforms(k, train=True))
        test_ds = load_split(dataset, root, train=False, transform=torchvision_transforms(k, train=False))
        val_ds = None
        if val_split:
            held_idx = val_indices(len(train_ds), val_split)
            kept = sorted(set(range(len(train_ds))) - set(held_idx))
            plain = load_split(dataset, root, train=True, transform=torchvision_transforms(k, train=False))
            train_ds, val_ds = Subset(train_ds, kept), Subset(plain, held_idx)
        train = DataLoader(train_ds, batch_size=batch_size, shuffle=True, **common)
        test = DataLoader(test_ds, batch_size=eval_batch_size, **common)
        val = DataLoader(val_ds, batch_size=eval_batch_size, **common) if val_ds is not None else None
        sizes = (len(train_ds), len(val_ds) if val_ds is not None else 0, len(test_ds))
    return Loaders(train, test, val, dict(zip(("train_images", "val_images", "test_images"), sizes)))
