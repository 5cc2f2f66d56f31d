import os
import pickle
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from cifarbench.errors import UsageError
from cifarbench.system import usable_cores
from cifarbench.train import data


def test_synthetic_is_written_in_the_cifar_layout_and_read_by_torchvision(synthetic_root):
    folder = synthetic_root / "synthetic10" / "cifar-10-batches-py"
    # other tests share this data: a check they made leaves the checksum cache, a dot-file, beside it
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == sorted(
        [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch", "batches.meta", "MD5SUMS"]
    )
    with open(folder / "data_batch_1", "rb") as fh:
        batch = pickle.load(fh, encoding="latin1")
    assert batch["data"].dtype == np.uint8 and batch["data"].shape == (200, 3072)
    train = data.load_split("synthetic10", synthetic_root, train=True)
    assert len(train) == 1000 and train.data.shape == (1000, 32, 32, 3) and len(train.classes) == 10
    test100 = data.load_split("synthetic100", synthetic_root, train=False)
    assert len(test100) == 500 and max(test100.targets) < 100 and len(test100.classes) == 100
    assert data.check_dataset("synthetic100", synthetic_root) is True


def test_synthetic_is_deterministic(tmp_path, synthetic_root):
    data.write_synthetic("synthetic10", tmp_path, train_size=1000, test_size=500)
    ours = (tmp_path / "synthetic10" / "cifar-10-batches-py" / "MD5SUMS").read_text()
    assert ours == (synthetic_root / "synthetic10" / "cifar-10-batches-py" / "MD5SUMS").read_text()


def test_synthetic_classes_differ_in_structure(synthetic_root):
    images, labels = data.load_arrays("synthetic10", synthetic_root, train=True)
    means = torch.stack([images[labels == c].float().mean(0) for c in range(10)])
    # class means are far apart compared with the spread of one class's mean estimate
    gaps = torch.cdist(means.flatten(1), means.flatten(1))[~torch.eye(10, dtype=torch.bool)]
    assert gaps.min() > 5 * 40 / (100**0.5)


def _loaders(root, loader, batch_size=64):
    return data.make_loaders(
        dataset="synthetic10",
        root=root,
        loader=loader,
        batch_size=batch_size,
        seed=0,
        num_workers=0,
        eval_batch_size=100,
    )


def test_both_loaders_give_the_same_test_tensors(synthetic_root):
    _, dev = _loaders(synthetic_root, "device")
    _, tv = _loaders(synthetic_root, "torchvision")
    for (xd, yd), (xt, yt) in zip(dev, tv):
        assert xd.dtype == xt.dtype == torch.float32 and xd.shape == xt.shape
        assert torch.equal(yd, yt)
        assert torch.allclose(xd, xt, atol=1e-5)


def test_both_loaders_give_the_same_train_shapes_and_normalisation(synthetic_root):
    stats = {}
    for name in ("device", "torchvision"):
        train, _ = _loaders(synthetic_root, name)
        batches = list(train)
        assert len(batches) == len(train) == 16
        x, y = batches[0]
        assert x.shape == (64, 3, 32, 32) and x.dtype == torch.float32 and y.dtype == torch.int64
        assert batches[-1][0].shape[0] == 1000 - 15 * 64
        xs = torch.cat([b[0] for b in batches])
        stats[name] = (xs.mean((0, 2, 3)), xs.std((0, 2, 3)))
    assert torch.allclose(stats["device"][0], stats["torchvision"][0], atol=0.02)
    assert torch.allclose(stats["device"][1], stats["torchvision"][1], atol=0.02)


def _coded_image():
    """A uint8 image whose pixels encode their own coordinates: value = 8*row + col/4 in channel 0, etc."""
    r = np.arange(32)
    img = np.zeros((32, 32, 3), np.uint8)
    img[..., 0] = 100 + r[:, None]  # row code
    img[..., 1] = 100 + r[None, :]  # column code
    img[..., 2] = 255
    return img


def _offsets_and_flips(crops: np.ndarray):
    """From HWC uint8 crops of the coded image, recover (dy, dx, flipped) per crop."""
    out = []
    for c in crops:
        inside = c[..., 2] == 255
        rows, cols = np.nonzero(inside)
        top, left = rows.min(), cols.min()
        dy = 4 - top + (c[top, left, 0] - 100)
        row_codes = c[top, cols[rows == top], 1].astype(int)
        flipped = len(row_codes) > 1 and row_codes[0] > row_codes[-1]
        dx = (
            4 - left + (row_codes.min() - 100)
            if not flipped
            else 4 - (31 - cols[rows == top].max()) + (row_codes.min() - 100)
        )
        out.append((int(dy), int(dx), bool(flipped)))
    return np.array(out)


def _check_augmentation_statistics(stats):
    n = len(stats)
    assert stats[:, 0].min() == 0 and stats[:, 0].max() == 8 and stats[:, 1].min() == 0 and stats[:, 1].max() == 8
    for axis in (0, 1):
        counts = np.bincount(stats[:, axis], minlength=9)
        assert np.all(np.abs(counts - n / 9) < 0.35 * n / 9), counts
    assert abs(stats[:, 2].mean() - 0.5) < 0.05


def test_device_augmentation_crop_and_flip_statistics():
    img = torch.from_numpy(_coded_image()).permute(2, 0, 1)
    n = 3000
    loader = data.DeviceLoader(
        img.expand(n, -1, -1, -1), torch.zeros(n, dtype=torch.long), num_classes=10, batch_size=n, train=True
    )
    crops = loader.augment(torch.arange(n), torch.Generator().manual_seed(0))
    assert crops.dtype == torch.uint8 and crops.shape == (n, 3, 32, 32)
    _check_augmentation_statistics(_offsets_and_flips(crops.permute(0, 2, 3, 1).numpy()))


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_device_crops_are_exactly_slices_of_the_padded_images(memory_format):
    n = 300
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    loader = data.DeviceLoader(
        images, torch.zeros(n, dtype=torch.long), num_classes=10, batch_size=64, train=True, memory_format=memory_format
    )
    idx = torch.randperm(n, generator=torch.Generator().manual_seed(2))[:200]
    crops = loader.augment(idx, torch.Generator().manual_seed(3))
    # the same draws, in the order augment makes them
    g = torch.Generator().manual_seed(3)
    dy, dx = torch.randint(0, 9, (200,), generator=g), torch.randint(0, 9, (200,), generator=g)
    flip = torch.rand((200,), generator=g) < 0.5
    padded = torch.nn.functional.pad(images, (4, 4, 4, 4))
    expected = torch.stack(
        [padded[i, :, a : a + 32, b : b + 32] for i, a, b in zip(idx.tolist(), dy.tolist(), dx.tolist())]
    )
    assert torch.equal(crops, torch.where(flip.view(-1, 1, 1, 1), expected.flip(3), expected))


def test_torchvision_augmentation_crop_and_flip_statistics():
    torch.manual_seed(0)
    steps = data.torchvision_transforms(10, train=True).transforms[:2]
    img = Image.fromarray(_coded_image())
    crops = []
    for _ in range(3000):
        out = img
        for step in steps:
            out = step(out)
        crops.append(np.asarray(out))
    _check_augmentation_statistics(_offsets_and_flips(np.stack(crops)))


def test_device_loader_order_depends_on_seed_and_epoch_only(synthetic_root):
    def first_labels(seed, epoch):
        train, _ = data.make_loaders(
            dataset="synthetic10", root=synthetic_root, loader="device", batch_size=64, seed=seed
        )
        train.sampler.set_epoch(epoch)
        return next(iter(train))[0]

    assert torch.equal(first_labels(0, 3), first_labels(0, 3))
    assert not torch.equal(first_labels(0, 3), first_labels(0, 4))
    assert not torch.equal(first_labels(0, 3), first_labels(1, 3))


def test_missing_dataset_names_root_and_command(tmp_path):
    with pytest.raises(UsageError, match=r"dataset cifar10 not found in .*cifarbench data download --root"):
        data.check_dataset("cifar10", tmp_path)
    with pytest.raises(UsageError, match=r"cifarbench data synthetic --root"):
        data.check_dataset("synthetic100", tmp_path)


def test_checksum_mismatch_and_no_verify(tmp_path, synthetic_root):
    shutil.copytree(synthetic_root / "synthetic10", tmp_path / "synthetic10")
    batch = tmp_path / "synthetic10" / "cifar-10-batches-py" / "data_batch_2"
    with open(batch, "rb") as fh:
        content = pickle.load(fh)
    content["data"][0, 0] ^= 1  # a re-encoded copy: still readable, different bytes
    with open(batch, "wb") as fh:
        pickle.dump(content, fh)
    with pytest.raises(UsageError, match=r"checksum mismatch for .*data_batch_2.*--no-verify"):
        data.check_dataset("synthetic10", tmp_path)
    assert data.check_dataset("synthetic10", tmp_path, verify=False) is False
    assert len(data.load_split("synthetic10", tmp_path, train=True)) == 1000


def test_corrupt_pickle_is_one_clear_error(tmp_path, synthetic_root):
    shutil.copytree(synthetic_root / "synthetic10", tmp_path / "synthetic10")
    batch = tmp_path / "synthetic10" / "cifar-10-batches-py" / "test_batch"
    batch.write_bytes(batch.read_bytes()[:1000])
    with pytest.raises(UsageError, match=r"cannot read synthetic10 .*corrupt file"):
        data.load_split("synthetic10", tmp_path, train=False)


def test_synthetic_cli(tmp_path, capsys):
    from cifarbench.cli import main

    assert (
        main(
            [
                "data",
                "synthetic",
                "--root",
                str(tmp_path),
                "--dataset",
                "synthetic10",
                "--train-size",
                "50",
                "--test-size",
                "20",
            ]
        )
        == 0
    )
    assert "synthetic10: 50 train / 20 test" in capsys.readouterr().out
    assert len(data.load_split("synthetic10", tmp_path, train=True)) == 50
    assert main(["data", "synthetic", "--root", str(tmp_path), "--train-size", "0"]) == 2
    assert "must be an integer >= 1" in capsys.readouterr().err


def test_torchvision_loader_defaults_to_a_worker_per_core_this_process_may_use(synthetic_root):
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(allowed)})  # as under SLURM: one core of a larger node
        train, test = data.make_loaders(
            dataset="synthetic10", root=synthetic_root, loader="torchvision", batch_size=64, seed=0
        )
    finally:
        os.sched_setaffinity(0, allowed)
    assert usable_cores() == len(allowed)
    assert train.num_workers == test.num_workers == 1
