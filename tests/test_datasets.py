"""The datasets' on-disk facts and the data check, on small stand-in files in the real layout; torchvision only
for comparing the published checksums with its own."""

import contextlib
import hashlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from torchvision import datasets as tvd

from cifarbench.store import datasets
from cifarbench.store.datasets import CACHE_NAME, DataError, check_dataset


def _fake_synthetic(root: Path, dataset: str = "synthetic10") -> Path:
    """Small stand-in files in the dataset's folder, with their MD5SUMS."""
    folder = datasets.dataset_folder(dataset, root)
    folder.mkdir(parents=True)
    sums = ""
    for i, name in enumerate(datasets.FILES[dataset].layout.files):
        content = f"{name} {i}\n".encode() * 1000
        (folder / name).write_bytes(content)
        sums += f"{hashlib.md5(content).hexdigest()}  {name}\n"
    (folder / "MD5SUMS").write_text(sums)
    return folder


@pytest.fixture
def hashed(monkeypatch) -> list[str]:
    """The names of the files hashed, in order."""
    names: list[str] = []
    real = datasets.md5

    def counting(path: Path) -> str:
        names.append(path.name)
        return real(path)

    monkeypatch.setattr(datasets, "md5", counting)
    return names


@pytest.mark.parametrize("layout, reader", [(datasets.CIFAR10, tvd.CIFAR10), (datasets.CIFAR100, tvd.CIFAR100)])
def test_the_real_layouts_are_torchvisions(layout, reader):
    assert layout.base_folder == reader.base_folder
    assert [list(pair) for pair in layout.train_list] == reader.train_list
    assert [list(pair) for pair in layout.test_list] == reader.test_list
    assert layout.meta == (reader.meta["filename"], reader.meta["md5"])


def test_each_dataset_has_its_folder(tmp_path):
    assert datasets.dataset_folder("cifar10", tmp_path) == tmp_path / "cifar-10-batches-py"
    assert datasets.dataset_folder("cifar100", tmp_path) == tmp_path / "cifar-100-python"
    assert datasets.dataset_folder("synthetic10", tmp_path) == tmp_path / "synthetic10" / "cifar-10-batches-py"
    assert datasets.dataset_folder("synthetic100", tmp_path) == tmp_path / "synthetic100" / "cifar-100-python"
    assert datasets.FILES["synthetic100"].layout is datasets.CIFAR100 and datasets.FILES["synthetic10"].synthetic


def test_present_files_pass_and_verified_ones_say_so(tmp_path):
    _fake_synthetic(tmp_path)
    assert check_dataset("synthetic10", tmp_path, verify=False) is False
    assert check_dataset("synthetic10", tmp_path) is True


def test_a_missing_file_is_named_with_the_command_that_makes_it(tmp_path):
    folder = _fake_synthetic(tmp_path)
    (folder / "data_batch_3").unlink()
    with pytest.raises(DataError, match=r"dataset synthetic10 not found .*cifarbench data synthetic --root .*"):
        check_dataset("synthetic10", tmp_path, verify=False)
    with pytest.raises(DataError, match=r"; missing: data_batch_3$"):
        check_dataset("synthetic10", tmp_path)


def test_missing_real_data_names_every_file_and_the_download(tmp_path):
    with pytest.raises(DataError) as e:
        check_dataset("cifar100", tmp_path)
    assert str(e.value) == (
        f"dataset cifar100 not found in {tmp_path.resolve()} (looked for {tmp_path / 'cifar-100-python'}); "
        f"run `cifarbench data download --root {tmp_path} --dataset cifar100`; missing: train, test, meta"
    )


def test_missing_synthetic_data_without_records_offers_cifars_size_or_a_smoke_tests(tmp_path):
    looked = f"dataset synthetic10 not found in {tmp_path.resolve()} (looked for {tmp_path / 'synthetic10'}"
    command = f"cifarbench data synthetic --root {tmp_path} --dataset synthetic10"
    for results in (None, tmp_path / "results"):  # no results folder known, or one without a run of it
        with pytest.raises(DataError) as e:
            check_dataset("synthetic10", tmp_path, results=results)
        assert str(e.value) == (
            f"{looked}/cifar-10-batches-py); run `{command} --train-size 50000 --test-size 10000` for CIFAR's "
            "sizes, or with `--train-size 1000 --test-size 200` instead for a smoke test; missing: data_batch_1, "
            "data_batch_2, data_batch_3, data_batch_4, data_batch_5, test_batch, batches.meta"
        )


def test_missing_synthetic_data_is_written_at_the_size_its_recorded_runs_read(tmp_path, write_records):
    smoke = {"dataset": "synthetic10", "train_images": 900, "val_split": 100, "test_images": 200}
    results = write_records(
        [
            {**smoke, "seed": 0},
            {**smoke, "seed": 1},
            {"dataset": "synthetic10", "train_images": 5000, "test_images": 500, "seed": 2},
            {"dataset": "synthetic100", "train_images": 300, "test_images": 50, "seed": 3},
            {"dataset": "cifar10", "train_images": 50000, "test_images": 10000, "seed": 4},
        ]
    )
    assert datasets.recorded_sizes("synthetic10", results) == {(1000, 200): 2, (5000, 500): 1}
    with pytest.raises(DataError) as e:
        check_dataset("synthetic10", tmp_path / "data", results=results)
    assert (
        f"; run `cifarbench data synthetic --root {tmp_path / 'data'} --dataset synthetic10 --train-size 1000 "
        f"--test-size 200`, the size 2 of the 3 runs recorded in {results} read; missing: data_batch_1, "
    ) in str(e.value)
    with pytest.raises(DataError) as e:
        check_dataset("synthetic100", tmp_path / "data", results=results)
    assert f"--train-size 300 --test-size 50`, the size 1 run recorded in {results} read; " in str(e.value)


def test_a_synthetic_dataset_without_its_checksums_is_rewritten_at_its_own_size(tmp_path):
    from cifarbench.train import data

    data.write_synthetic("synthetic10", tmp_path, train_size=300, test_size=50)
    (datasets.dataset_folder("synthetic10", tmp_path) / "MD5SUMS").unlink()
    assert check_dataset("synthetic10", tmp_path, verify=False) is False
    with pytest.raises(DataError) as e:
        check_dataset("synthetic10", tmp_path)
    assert str(e.value).endswith(
        "MD5SUMS is missing: re-create the data with `cifarbench data synthetic "
        f"--root {tmp_path} --dataset synthetic10 --train-size 300 --test-size 50 --force`"
    )


def test_a_checksum_mismatch_names_the_file(tmp_path):
    folder = _fake_synthetic(tmp_path)
    (folder / "test_batch").write_bytes(b"re-encoded")
    with pytest.raises(DataError, match=r"checksum mismatch for .*test_batch: re-download it, or pass --no-verify"):
        check_dataset("synthetic10", tmp_path)


def test_real_data_is_checked_against_the_published_checksums(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    for name in datasets.CIFAR10.files:
        (folder / name).write_bytes(b"not CIFAR")
    with pytest.raises(DataError, match=r"checksum mismatch for .*data_batch_1:"):
        check_dataset("cifar10", tmp_path)


def test_a_second_check_hashes_nothing(tmp_path, hashed):
    folder = _fake_synthetic(tmp_path)
    check_dataset("synthetic10", tmp_path)
    assert sorted(hashed) == sorted(datasets.CIFAR10.files)
    cache = json.loads((folder / CACHE_NAME).read_text())
    assert cache["test_batch"]["md5"] == datasets.md5(folder / "test_batch")
    hashed.clear()
    assert check_dataset("synthetic10", tmp_path) is True
    assert hashed == []


def test_a_changed_file_is_hashed_again(tmp_path, hashed):
    folder = _fake_synthetic(tmp_path)
    check_dataset("synthetic10", tmp_path)
    batch = folder / "data_batch_2"
    same_size = bytes(len(batch.read_bytes()))
    batch.write_bytes(same_size)
    stat = batch.stat()
    os.utime(batch, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))  # a coarse clock may not have moved on
    hashed.clear()
    with pytest.raises(DataError, match=r"checksum mismatch for .*data_batch_2"):
        check_dataset("synthetic10", tmp_path)
    assert hashed == ["data_batch_2"]
    batch.write_bytes(b"shorter")  # a new size alone is enough
    os.utime(batch, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    hashed.clear()
    with pytest.raises(DataError, match=r"checksum mismatch for .*data_batch_2"):
        check_dataset("synthetic10", tmp_path)
    assert hashed == ["data_batch_2"]


@pytest.mark.parametrize("content", ["{not json", "[1, 2]", '{"test_batch": {"size": "x"}}', "\udcff"])
def test_an_unreadable_cache_is_ignored_and_replaced(tmp_path, hashed, content):
    folder = _fake_synthetic(tmp_path)
    (folder / CACHE_NAME).write_text(content, errors="surrogateescape")
    assert check_dataset("synthetic10", tmp_path) is True
    assert len(hashed) == len(datasets.CIFAR10.files)
    assert set(json.loads((folder / CACHE_NAME).read_text())) == set(datasets.CIFAR10.files)


def test_a_read_only_folder_is_hashed_every_time_and_left_alone(tmp_path, hashed):
    folder = _fake_synthetic(tmp_path)
    before = sorted(p.name for p in folder.iterdir())
    with _read_only(folder):
        assert check_dataset("synthetic10", tmp_path) is True
        assert check_dataset("synthetic10", tmp_path) is True
    assert len(hashed) == 2 * len(datasets.CIFAR10.files)
    assert sorted(p.name for p in folder.iterdir()) == before


@contextlib.contextmanager
def _read_only(folder: Path):
    """chmod 555, and for root, whom file modes do not stop, the immutable attribute too."""
    root = os.geteuid() == 0
    if root and not shutil.which("chattr"):
        pytest.skip("running as root without chattr: no folder can be made read-only to root")
    folder.chmod(0o555)
    if root:
        subprocess.run(["chattr", "+i", str(folder)], check=True)
    try:
        yield
    finally:
        if root:
            subprocess.run(["chattr", "-i", str(folder)], check=True)
        folder.chmod(0o755)
