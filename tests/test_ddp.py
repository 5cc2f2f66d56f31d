"""A run on several processes (DDP) trains what the run trains on one: each rank's slices of the device loader's
batches put together are the single-process batches; global BatchNorm is BatchNorm over the global batch; the
ranks' scaled losses make DDP's averaged gradient the global batch's; and, on the real local cluster, a run of
2 tasks (gloo, CPU) matches the same run of 1 task epoch by epoch.

The cluster test needs ``bash slurm/cluster.sh up``; the others run anywhere."""

import dataclasses
import shutil
import subprocess

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from cifarbench.config.resources import Budget
from cifarbench.config.spec import RunSpec, get_recipe
from cifarbench.store import records
from cifarbench.train import data, ddp
from cifarbench.train.models import seeded_model

# Small steps, so that the comparison measures the code and not float32 chaos (as tests/test_fuse.py's GENTLE)
GENTLE = dataclasses.replace(get_recipe("step-200"), name="gentle", lr=0.002)
TRAIN_IMAGES = 300  # 4 batches of 64 and one of 44 per epoch: the last splits 22/22 over 2 ranks, 14/15/15 over 3


def _images(n: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    return images, torch.randint(0, 10, (n,), generator=g)


# --- the data ------------------------------------------------------------------------------------------------------


def test_rank_slices_split_a_batch_evenly_and_in_order():
    assert [ddp.rank_slice(44, r, 2) for r in range(2)] == [slice(0, 22), slice(22, 44)]
    assert [ddp.rank_slice(44, r, 3) for r in range(3)] == [slice(0, 14), slice(14, 29), slice(29, 44)]
    assert ddp.rank_slice(64, 0, 1) == slice(0, 64)


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_the_ranks_batches_put_together_are_the_single_process_batches(world_size, memory_format):
    images, labels = _images(TRAIN_IMAGES)

    def loader(rank: int, world: int) -> data.DeviceLoader:
        return data.DeviceLoader(
            images,
            labels,
            num_classes=10,
            batch_size=64,
            train=True,
            seed=3,
            memory_format=memory_format,
            rank=rank,
            world_size=world,
        )

    alone, shares = loader(0, 1), [loader(r, world_size) for r in range(world_size)]
    for epoch in range(3):
        for each in (alone, *shares):
            each.set_epoch(epoch)
        batches = list(alone)
        assert len(batches) == len(alone) == 5 and len(batches[-1][1]) == 44
        for index, (whole, parts) in enumerate(zip(batches, zip(*shares, strict=True), strict=True)):
            x, y = whole
            assert [len(p[1]) for p in parts] == [len(y) * (r + 1) // world_size - len(y) * r // world_size
                                                  for r in range(world_size)]  # fmt: skip
            assert torch.equal(torch.cat([p[0] for p in parts]), x)
            assert torch.equal(torch.cat([p[1] for p in parts]), y)
            assert all(each.global_batch(index) == len(y) for each in shares)


def test_the_torchvision_loader_refuses_several_processes():
    with pytest.raises(ValueError, match="loader: torchvision cannot give each of 2 devices its slice"):
        RunSpec(model="resnet20", dataset="cifar10", recipe=get_recipe("step-160"), batch_size=64, seed=0,
                gpus_per_run=2, loader="torchvision")  # fmt: skip


# --- BatchNorm and the gradient --------------------------------------------------------------------------------------


def test_global_batchnorm_is_batchnorm_outside_ddp_and_loads_the_same_weights():
    reference = seeded_model("resnet20", 10, 0)
    converted = ddp.global_batchnorm(seeded_model("resnet20", 10, 0))
    assert sum(isinstance(m, ddp.GlobalBatchNorm) for m in converted.modules()) == sum(
        isinstance(m, nn.BatchNorm2d) for m in reference.modules()
    )
    assert list(converted.state_dict()) == list(reference.state_dict())
    converted.load_state_dict(reference.state_dict())  # a checkpoint of either loads into the other
    x = torch.randn(8, 3, 32, 32)
    for train in (True, False):
        reference.train(train)
        converted.train(train)
        assert torch.equal(converted(x), reference(x))
    assert all(torch.equal(a, b) for a, b in zip(converted.state_dict().values(), reference.state_dict().values()))


def _small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 8 * 8, 10)
    )


def _batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.randn(11, 3, 8, 8, generator=g) * 3 + 1, torch.randint(0, 10, (11,), generator=g)


def _rank_step(rank: int, world_size: int, folder: str) -> None:
    """One DDP training step of rank ``rank`` on its share of ``_batch()``; its gradients, output and BatchNorm
    buffers saved to ``folder``."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{folder}/rendezvous", rank=rank, world_size=world_size)
    try:
        model = DistributedDataParallel(ddp.global_batchnorm(_small_model()))
        x, y = _batch()
        part = ddp.rank_slice(len(y), rank, world_size)
        out = model(x[part])
        summed = nn.functional.cross_entropy(out, y[part], reduction="sum")
        ddp.rank_loss(summed, global_n=len(y), world_size=world_size).backward()
        saved = {f"grad.{k}": p.grad for k, p in model.module.named_parameters()}
        saved.update({f"buffer.{k}": b for k, b in model.module.named_buffers()}, out=out.detach())
        torch.save(saved, f"{folder}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_ranks_get_the_global_batchs_gradient_and_batchnorm_statistics_from_uneven_shares(tmp_path):
    torch.multiprocessing.start_processes(_rank_step, args=(2, str(tmp_path)), nprocs=2, start_method="fork")
    model = _small_model()
    x, y = _batch()
    out = model(x)
    nn.functional.cross_entropy(out, y).backward()
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert torch.allclose(torch.cat([r["out"] for r in ranks]), out.detach(), atol=1e-5)
    for k, p in model.named_parameters():
        for r in ranks:
            assert torch.allclose(r[f"grad.{k}"], p.grad, rtol=1e-4, atol=1e-6), k
    for k, b in model.named_buffers():
        for r in ranks:
            assert torch.allclose(r[f"buffer.{k}"].to(b.dtype), b, rtol=1e-5, atol=1e-6), k


# --- on the real cluster -------------------------------------------------------------------------------------------


def _cluster_problem() -> str | None:
    if not all(shutil.which(tool) for tool in ("sinfo", "sbatch", "scontrol")):
        return "SLURM is not installed (no sinfo/sbatch/scontrol on the PATH)"
    try:
        ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"the SLURM cluster is not answering ({e}); start it with `bash slurm/cluster.sh up`"
    return None if "UP" in ping.stdout else "the SLURM cluster is not answering; `bash slurm/cluster.sh up`"


def _tiny_spec(root, results, **kw) -> RunSpec:
    fields = dict(
        model="resnet20",
        dataset="synthetic10",
        recipe=GENTLE,
        batch_size=64,
        seed=0,
        epochs=2,
        precision="32-true",
        deterministic=True,
        data_root=str(root),
        results=str(results),
    )
    return RunSpec(**{**fields, **kw})


def _train_on_slurm(folder, specs_and_tasks: list[tuple[RunSpec, int]]) -> list[dict]:
    """Each spec trained by a job of that many tasks on one node (1 CPU each), submitted through submitit as
    ``cifarbench submit`` does; their records."""
    import submitit

    from cifarbench.train.job import RunJob

    jobs = []
    for spec, tasks in specs_and_tasks:
        executor = submitit.AutoExecutor(folder / f"jobs-{tasks}", cluster="slurm")
        executor.update_parameters(tasks_per_node=tasks, nodes=1, cpus_per_task=1, gpus_per_node=0, timeout_min=10)
        jobs.append(executor.submit(RunJob(spec, Budget())))
    try:
        paths = [job.results()[0] for job in jobs]  # rank 0's; every rank returns the record's path
    finally:
        for job in jobs:
            if not job.done():
                job.cancel()
    return [records.read_record(path) for path in paths]


@pytest.mark.slurm
def test_two_tasks_train_the_run_one_task_trains(tmp_path):
    if problem := _cluster_problem():
        pytest.skip(problem)
    root = tmp_path / "data"
    data.write_synthetic("synthetic10", root, train_size=TRAIN_IMAGES, test_size=100)
    one = _tiny_spec(root, tmp_path / "one")
    two = _tiny_spec(root, tmp_path / "two", gpus_per_run=2, sync_bn=True)
    assert one.run_id == two.run_id  # the same run: global BatchNorm changes nothing
    alone, ddp_run = _train_on_slurm(tmp_path, [(one, 1), (two, 2)])
    assert alone["status"] == ddp_run["status"] == "completed", (alone["error"], ddp_run["error"])
    assert (alone["world_size"], alone["sync_bn"]) == (1, None)
    assert (ddp_run["world_size"], ddp_run["sync_bn"]) == (2, True)
    assert (alone["alloc_cpus"], ddp_run["alloc_cpus"], ddp_run["alloc_gpus"]) == (1, 2, 0)
    assert ddp_run["epochs_done"] == alone["epochs_done"] == 2
    for key in ("train_loss", "test_loss", "test_acc"):
        assert ddp_run[key] == pytest.approx(alone[key], rel=1e-3, abs=1e-6), key


@pytest.mark.slurm
@pytest.mark.extended
def test_per_device_batchnorm_is_another_run_and_global_batchnorm_stays_the_run_for_longer(tmp_path):
    if problem := _cluster_problem():
        pytest.skip(problem)
    root = tmp_path / "data"
    data.write_synthetic("synthetic10", root, train_size=TRAIN_IMAGES, test_size=100)
    one = _tiny_spec(root, tmp_path / "one", epochs=3)
    synced = _tiny_spec(root, tmp_path / "synced", epochs=3, gpus_per_run=2)
    apart = _tiny_spec(root, tmp_path / "apart", epochs=3, gpus_per_run=2, sync_bn=False)
    assert synced.run_id == one.run_id != apart.run_id
    alone, together, separate = _train_on_slurm(tmp_path, [(one, 1), (synced, 2), (apart, 2)])
    assert {r["status"] for r in (alone, together, separate)} == {"completed"}
    assert (separate["run_id"], separate["world_size"], separate["sync_bn"]) == (apart.run_id, 2, False)
    for key in ("train_loss", "test_loss", "test_acc"):
        assert together[key] == pytest.approx(alone[key], rel=1e-3, abs=1e-6), key

    # BatchNorm over 32 images per device normalises otherwise than over the 64 of the batch: the curves part
    # further than rounding parts the synced run's
    def gap(run: dict) -> float:
        return max(abs(a - b) / abs(b) for key in ("train_loss", "test_loss") for a, b in zip(run[key], alone[key]))

    assert gap(separate) > max(10 * gap(together), 1e-4), (gap(separate), gap(together))
