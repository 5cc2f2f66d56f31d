"""Where each dataset lives on disk, and the check that its files are there and intact, without torch.

The real datasets use torchvision's python-pickle layout (``<root>/cifar-10-batches-py/``,
``<root>/cifar-100-python/``) with the published checksums, file for file as torchvision's ``CIFAR10`` and
``CIFAR100`` list them. A synthetic dataset lives in ``<root>/<name>/`` in the layout of the real one with the
same number of classes, and its checksums are in the ``MD5SUMS`` file beside its data.

Hashing CIFAR takes seconds and every run checks its data, so md5s are cached in ``.cifarbench-md5.json`` in the
data's folder, keyed by file name, size and modification time.

A run's id says which data it trained on wherever that is not the checksum-verified CIFAR: ``fingerprint`` hashes
the files' names, sizes and md5s (from that cache), so the same files in two folders are the same data, and a
synthetic copy of another size is other data.
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import pickle
from dataclasses import dataclass
from pathlib import Path

from cifarbench.config.spec import DATASETS
from cifarbench.errors import UsageError, plural
from cifarbench.store.atomic import write_text

CACHE_NAME = ".cifarbench-md5.json"
SIZES_NAME = ".cifarbench-images.json"  # a synthetic dataset's image counts, keyed by its files' sizes and times
STANDARD_IMAGES = (50_000, 10_000)  # CIFAR-10's and CIFAR-100's training and test images
# what `cifarbench data synthetic` writes by default: CIFAR's sizes
SYNTHETIC_SIZES = {"train_size": STANDARD_IMAGES[0], "test_size": STANDARD_IMAGES[1]}
SMOKE_SIZES = (1_000, 200)  # jobs/smoke.yaml's synthetic data: written in seconds, trained on in minutes


class DataError(UsageError):
    """Data that is missing, corrupt or fails its checksums."""


@dataclass(frozen=True, kw_only=True)
class CifarLayout:
    """A folder of CIFAR pickles: its name, and each file with the published md5 of the real data set."""

    base_folder: str
    train_list: tuple[tuple[str, str], ...]
    test_list: tuple[tuple[str, str], ...]
    meta: tuple[str, str]

    @property
    def files(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.train_list + self.test_list) + (self.meta[0],)

    @property
    def md5s(self) -> dict[str, str]:
        return dict(self.train_list + self.test_list + (self.meta,))


CIFAR10 = CifarLayout(
    base_folder="cifar-10-batches-py",
    train_list=(
        ("data_batch_1", "c99cafc152244af753f735de768cd75f"),
        ("data_batch_2", "d4bba439e000b95fd0a9bffe97cbabec"),
        ("data_batch_3", "54ebc095f3ab1f0389bbae665268c751"),
        ("data_batch_4", "634d18415352ddfa80567beed471001a"),
        ("data_batch_5", "482c414d41f54cd18b22e5b47cb7c3cb"),
    ),
    test_list=(("test_batch", "40351d587109b95175f43aff81a1287e"),),
    meta=("batches.meta", "5ff9c542aee3614f3951f8cda6e48888"),
)
CIFAR100 = CifarLayout(
    base_folder="cifar-100-python",
    train_list=(("train", "16019d7e3df5f24257cddd939b257f8d"),),
    test_list=(("test", "f0ef6b0ae62326f3e7ffdfab6717acfc"),),
    meta=("meta", "7973b15100ade9c7d40fb424638fde48"),
)


@dataclass(frozen=True, kw_only=True)
class DatasetFiles:
    name: str
    layout: CifarLayout
    synthetic: bool

    def folder(self, root: str | Path) -> Path:
        return Path(root) / (self.name if self.synthetic else "") / self.layout.base_folder


FILES = {
    name: DatasetFiles(name=name, layout=CIFAR10 if d.num_classes == 10 else CIFAR100, synthetic=d.synthetic)
    for name, d in DATASETS.items()
}


def dataset_folder(dataset: str, root: str | Path) -> Path:
    return FILES[dataset].folder(root)


def _size_flags(sizes: tuple[int, int]) -> str:
    return f"--train-size {sizes[0]} --test-size {sizes[1]}"


def recreate_command(dataset: str, root: str | Path, sizes: tuple[int, int] = STANDARD_IMAGES) -> str:
    """The command that writes (or downloads) exactly ``dataset`` under ``root``, and nothing else; a synthetic one
    with ``sizes`` (training and test images)."""
    if FILES[dataset].synthetic:
        return f"cifarbench data synthetic --root {root} --dataset {dataset} {_size_flags(sizes)}"
    return f"cifarbench data download --root {root} --dataset {dataset}"


def missing_message(dataset: str, root: str | Path, *, results: str | Path | None = None) -> str:
    """Where ``dataset`` was looked for, and the command that makes it. A synthetic dataset's size is part of its
    runs' ids and no grid says it: the command writes the size most runs recorded in ``results`` read (the same size
    is the same data, so their records count again); where none is recorded, CIFAR's size or a smoke test's."""
    said = f"dataset {dataset} not found in {Path(root).resolve()} (looked for {dataset_folder(dataset, root)})"
    if not FILES[dataset].synthetic:
        return f"{said}; run `{recreate_command(dataset, root)}`"
    recorded = recorded_sizes(dataset, results) if results is not None else collections.Counter()
    if not recorded:
        return (
            f"{said}; run `{recreate_command(dataset, root)}` for CIFAR's sizes, or with "
            f"`{_size_flags(SMOKE_SIZES)}` instead for a smoke test"
        )
    (sizes, runs), *_ = recorded.most_common()
    who = f"{runs} of the {recorded.total()} runs" if len(recorded) > 1 else plural(runs, "run")
    return f"{said}; run `{recreate_command(dataset, root, sizes)}`, the size {who} recorded in {results} read"


def recorded_sizes(dataset: str, results: str | Path) -> collections.Counter[tuple[int, int]]:
    """(training images before the validation split, test images) of ``dataset`` -> how many runs recorded in
    ``results`` read it at that size."""
    from cifarbench.store import records, scan  # pyarrow: only once data is found missing

    fields = ("dataset", "train_images", "val_split", "test_images")
    sizes = (records.data_size(r) for r in scan.summaries(results, fields).values() if r["dataset"] == dataset)
    return collections.Counter(size for size in sizes if size is not None)


def check_dataset(dataset: str, root: str | Path, *, verify: bool = True, results: str | Path | None = None) -> bool:
    """Raise DataError unless every file is present (and, with ``verify``, has its checksum). ``results``: a results
    folder whose records say which size a missing synthetic dataset had (``missing_message``).

    Returns whether the checksums were verified."""
    folder = dataset_folder(dataset, root)
    missing = [name for name in FILES[dataset].layout.files if not (folder / name).is_file()]
    if missing:
        raise DataError(missing_message(dataset, root, results=results) + f"; missing: {', '.join(missing)}")
    if not verify:
        return False
    expected = _expected_md5(dataset, root)
    actual = _cached_md5s(folder, list(expected))
    for name, md5 in expected.items():
        if actual[name] != md5:
            raise DataError(
                f"checksum mismatch for {folder / name}: re-download it, or pass --no-verify "
                "(`verify: false` in a grid) to accept a copy in the same layout"
            )
    return True


def _expected_md5(dataset: str, root: str | Path) -> dict[str, str]:
    files = FILES[dataset]
    if not files.synthetic:
        return files.layout.md5s
    sums = files.folder(root) / "MD5SUMS"
    if not sums.is_file():
        command = recreate_command(dataset, root, synthetic_sizes(dataset, root) or STANDARD_IMAGES)
        raise DataError(f"{sums} is missing: re-create the data with `{command} --force`")  # the same data again
    # each line is '<md5> <name>'; a list pair (not reversed()'s iterator) is what dict()'s stub accepts
    return dict(line.split()[::-1] for line in sums.read_text().splitlines() if line.strip())


def md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _cached_md5s(folder: Path, names: list[str]) -> dict[str, str]:
    """The md5 of each file in ``folder``, hashing only those whose size or modification time differ from when
    the cache last saw them. The cache is rewritten when anything was hashed; a folder we may not write to
    (shared, read-only data) is simply hashed every time."""
    cache_path = folder / CACHE_NAME
    cache = _read_cache(cache_path)
    entries, sums = {}, {}
    for name in names:
        st = os.stat(folder / name)  # before hashing: a file rewritten meanwhile gets a new key, so is hashed again
        seen = cache.get(name)
        if (
            isinstance(seen, dict)
            and (seen.get("size"), seen.get("mtime_ns")) == (st.st_size, st.st_mtime_ns)
            and isinstance(seen.get("md5"), str)
        ):
            sums[name] = seen["md5"]
        else:
            sums[name] = md5(folder / name)
        entries[name] = {"size": st.st_size, "mtime_ns": st.st_mtime_ns, "md5": sums[name]}
    if entries != cache:
        with contextlib.suppress(OSError):
            write_text(cache_path, json.dumps(entries, indent=1, sort_keys=True) + "\n")
    return sums


def _read_cache(path: Path) -> dict:
    try:
        cache = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    return cache if isinstance(cache, dict) else {}


_fingerprints: dict[tuple, str | None] = {}  # (folder, the files' sizes and times) -> fingerprint, for this process


def fingerprint(dataset: str, root: str | Path) -> str | None:
    """None where ``root`` holds the checksum-verified ``dataset`` (real CIFAR, every md5 the published one), else
    16 hex digits of a hash of its files' names, sizes and md5s; also None where a file is missing (``submit``
    reports missing data). Hashes only what the md5 cache beside the data does not know, once per process."""
    files = FILES[dataset]
    folder = files.folder(root)
    try:
        stats = tuple((name, *_size_and_time(folder / name)) for name in files.layout.files)
    except OSError:
        return None
    key = (str(folder.resolve()), files, stats)
    if key not in _fingerprints:
        sums = _cached_md5s(folder, list(files.layout.files))
        if not files.synthetic and sums == files.layout.md5s:
            _fingerprints[key] = None
        else:
            text = "".join(f"{name} {size} {sums[name]}\n" for name, size, _ in sorted(stats))
            _fingerprints[key] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return _fingerprints[key]


def synthetic_sizes(dataset: str, root: str | Path) -> tuple[int, int] | None:
    """(training images, test images) of the synthetic ``dataset`` under ``root``; None where there is none. Counted
    from its files once, then kept in SIZES_NAME beside them for as long as the files' sizes and times stay."""
    files = FILES[dataset].layout
    folder = dataset_folder(dataset, root)
    train, test = [name for name, _ in files.train_list], [files.test_list[0][0]]
    try:
        key = [[name, *_size_and_time(folder / name)] for name in train + test]
    except OSError:
        return None
    cache = _read_cache(folder / SIZES_NAME)
    known = cache.get("images")
    if cache.get("files") == key and isinstance(known, list) and len(known) == 2:
        return int(known[0]), int(known[1])
    try:
        counts = []
        for names in (train, test):
            total = 0
            for name in names:
                with open(folder / name, "rb") as fh:
                    batch = pickle.load(fh, encoding="latin1")
                total += len(batch["labels" if "labels" in batch else "fine_labels"])
            counts.append(total)
    except (OSError, pickle.UnpicklingError, EOFError, KeyError, TypeError, ValueError):
        return None
    with contextlib.suppress(OSError):  # shared, read-only data: counted again next time
        write_text(folder / SIZES_NAME, json.dumps({"files": key, "images": counts}) + "\n")
    return counts[0], counts[1]


def image_counts(dataset: str, root: str | Path) -> tuple[int, int]:
    """(training images, test images) a run of ``dataset`` under ``root`` reads, before any validation split: the
    real datasets' own, a synthetic one's from its files; CIFAR's where they cannot be read (missing data)."""
    return (synthetic_sizes(dataset, root) if FILES[dataset].synthetic else None) or STANDARD_IMAGES


# The validation split is drawn with this key, not the run's seed: every run of a grid holds out the same images.
VAL_SPLIT_KEY = b"cifarbench validation split"


def val_indices(train_images: int, val_split: int) -> list[int]:
    """The indices (ascending) of the ``val_split`` training images held out for validation: those whose keyed
    BLAKE2b hashes come first, the same for every run, seed, process and version of numpy or torch."""
    if not 0 < val_split < train_images:
        raise DataError(f"val_split {val_split}: the training set has {train_images} images; hold out fewer")
    rank = lambda i: hashlib.blake2b(i.to_bytes(4, "little"), key=VAL_SPLIT_KEY, digest_size=8).digest()
    return sorted(sorted(range(train_images), key=rank)[:val_split])


def _size_and_time(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_size, st.st_mtime_ns
