"""How much memory an array task asks SLURM for (``mem_gb: auto``), and how many runs one GPU holds (``pack:
auto``), from the peaks that records (``peak_host_mb``, ``peak_device_mb``) and bench tables measured.

Evidence is of the same model and batch size, trained in the precision the run will train in (as ``estimate``
chooses it) on the same kind of device (a GPU, or a CPU). Of everything else the data's size changes a process's
peak most: a figure measured on less data than the run holds (its training, validation and test images) is raised
by DATA_BYTES_PER_IMAGE for each image more. The highest figure counts: memory is a limit, not an average.

``mem_gb: auto`` asks for host memory (sbatch's ``--mem``):

- a run alone: its process's peak;
- a pack of K: the sum of its runs' peaks (each trains in a worker process of its own, which is what its record
  measured) plus SUPERVISOR_MB for the job process that supervises them;
- a fused group of K: one process. Records of fused groups hold the group's peak: the nearest group size measured
  serves, as it is where it had at least K members, else with its part above BASE_MB scaled by K / K'. Without
  them: on a CPU, where the members' activations are host memory, BASE_MB plus K times the run's part above it; on
  a GPU the run's own peak, since its members' activations live on the GPU;
- without evidence of the model, a prior per model family and kind of device (``prior_host_mb``).

The request is that times MEM_MARGIN, rounded up to MEM_STEP_MB, at least MIN_MEM_MB.

``pack: auto`` (GPU allocations only) packs the most runs per GPU whose device-memory peaks, each plus
CUDA_PROCESS_MB for its own process's CUDA context and allocator slack, fit in the GPU's memory less GPU_HEADROOM;
at most one run per CPU of the task and no more than the runs there are; and no more than the fewest runs per GPU
that packed evidence shows within GAIN_TOLERANCE of the best throughput measured (where the best is at the most runs
measured, the gain may go on, and nothing caps it). The GPU's memory is ``gpu_mem_gb``, else GPU_MEMORY_GB's figure
for ``gpu_type``. Without device-memory evidence it refuses, naming the command that measures it. On whole nodes
(``exclusive``) the CPUs bound as many runs on every GPU, and a task may hold fewer runs than the node has GPUs
where the grid has no more.
"""

from __future__ import annotations

import math
import re
import shlex
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from cifarbench.cluster.estimate import ALONE, FUSE, PACK, Evidence, MemorySample, planned_images, precisions
from cifarbench.config.resources import Resources
from cifarbench.config.spec import ARCHS, RunSpec
from cifarbench.errors import UsageError, plural

MEM_MARGIN = 1.25  # the request: the planned peak times this
MEM_STEP_MB = 512
MIN_MEM_MB = 1024
# Resident memory of a process that has imported torch and lightning, before any data or model: the part of a peak
# that a fused group's members share. Measured on the development machine (torch 2.14.1, CPU build): 715 MiB.
BASE_MB = 720
SUPERVISOR_MB = 256  # a pack's job process: it supervises the workers and imports no torch (measured: ~120 MiB)
# Host memory per image of the data a run holds: the uint8 images (3,072 bytes; the training set padded, 4,800),
# the arrays they are read from, and the labels. Loading CIFAR's 60,000 images onto the CPU measured 671 MiB
# (11.5 KiB each); this is deliberately higher, for projecting small data onto large.
DATA_BYTES_PER_IMAGE = 16 * 1024
# Priors where no run of the model measured its peak: resident MiB of one run's process on a CPU, BASE_MB plus the
# data plus activations of batch_size x depth x this many KiB, and on a GPU a flat figure for CUDA's libraries and
# context in host memory. Training steps at batch 128 (32-true, channels_last, 2 threads) peaked above the base at
# 93-117 KiB per image and layer for resnet20/56/110 and 420-570 for resnet18/50; the priors round those up.
PRIOR_ACTIVATION_KIB = {"cifar": 120, "imagenet": 600}
PRIOR_GPU_HOST_MB = 4096
GPU_HEADROOM = 0.10  # of the GPU's memory left free (fragmentation, the MPS server, other tenants' contexts)
CUDA_PROCESS_MB = 1024  # per worker process on a GPU: its CUDA context and what the allocator reserves beyond its peak
GAIN_TOLERANCE = 0.05
# GPU memory in GB by the GRES type names sites use, matched as a substring of the type (the longest key first); a
# type that says its size ("a100_80gb", "v100-32g") is read as it says. Parts sold in two sizes list the smaller.
GPU_MEMORY_GB = {
    "b200": 180, "gh200": 96, "h200": 141, "h100": 80, "h800": 80, "a100": 40, "a800": 40, "a40": 48, "a30": 24,
    "a10": 24, "l40s": 48, "l40": 48, "l4": 24, "a6000": 48, "a5000": 24, "a4000": 16, "rtx6000": 24,
    "rtx8000": 48, "v100": 16, "p100": 16, "t4": 16, "4090": 24, "3090": 24, "2080": 11, "mi300": 192,
    "mi250": 128, "mi210": 64, "mi100": 32,
}  # fmt: skip
TWO_SIZES = {"a100": 80, "a800": 80, "v100": 32}
MEASURE = "cifarbench bench --what pack --model {model} --batch-size {batch} --pack 1,2,4,8 --results {results}"


class PlanError(UsageError):
    """A plan that cannot be made from the evidence there is (exit 2, nothing queued)."""


@dataclass(frozen=True, kw_only=True)
class Memory:
    """The host memory an array task asks for, and where the figure came from."""

    mb: int  # what is asked (MiB), the peak times MEM_MARGIN, rounded
    peak_mb: float  # the planned peak of the whole task
    source: str  # "records", "bench" or "prior"
    detail: str

    @property
    def gb(self) -> float:
        return self.mb / 1024


@dataclass(frozen=True, kw_only=True)
class PackChoice:
    """How many runs ``pack: auto`` puts in one array task, and why that many."""

    k: int
    detail: str


def held_images(spec: RunSpec, data: Mapping[tuple[str, str], tuple[int, int]] | None) -> int:
    """Pure: the images of the data ``spec`` holds (training set, its validation split included, and test set)."""
    train, test = planned_images(spec, data)
    return train + spec.held_out + test


def _fitting(
    samples: Sequence[MemorySample], spec: RunSpec, resources: Resources, *, what: str
) -> tuple[str, list[MemorySample]]:
    """The precision and the samples of ``what`` ("host" or "device") measured on the device ``resources`` asks
    for, in the precision the run will train in; an empty list when none."""
    gpu = resources.gpus_per_node > 0
    measured = [s for s in samples if (s.device != "cpu") == gpu and getattr(s, f"{what}_mb") is not None]
    for precision in precisions(spec, resources):
        chosen = [s for s in measured if s.precision == precision]
        if chosen:
            return precision, chosen
    return "", []


def _projected(sample: MemorySample, held: int) -> float:
    more = max(held - sample.data_images, 0)
    assert sample.host_mb is not None
    return sample.host_mb + more * DATA_BYTES_PER_IMAGE / 2**20


def prior_host_mb(spec: RunSpec, resources: Resources, held: int) -> tuple[float, str]:
    """Pure: the prior of one run's process peak (MiB) and what it is."""
    arch = ARCHS[spec.model]
    if resources.gpus_per_node:
        return float(PRIOR_GPU_HOST_MB), f"prior for a GPU process: {PRIOR_GPU_HOST_MB:,} MiB"
    data_mb = held * DATA_BYTES_PER_IMAGE / 2**20
    act_mb = spec.batch_size * arch.depth * PRIOR_ACTIVATION_KIB[arch.family] / 1024
    mb = BASE_MB + data_mb + act_mb
    return mb, (
        f"prior for {arch.family} ResNets on a CPU: {BASE_MB} + data {data_mb:,.0f} + batch {spec.batch_size} x "
        f"depth {arch.depth} x {PRIOR_ACTIVATION_KIB[arch.family]} KiB = {mb:,.0f} MiB"
    )


def _measured(
    spec: RunSpec, resources: Resources, evidence: Evidence, held: int, members: int
) -> tuple[float, str, str, int] | None:
    """(peak MiB, source, detail, members measured) of the process that trains ``members`` of ``spec``'s runs, from
    the evidence: of runs alone or packed, or for a fused group of fused groups, the nearest size at least as large
    first; None where there is none."""
    samples = evidence.memory.get((spec.model, spec.batch_size), ())
    if members > 1:
        groups = [s for s in samples if s.share == FUSE]
        sizes = sorted({s.k for s in groups}, key=lambda n: (n < members, abs(n - members)))
    else:
        groups, sizes = [s for s in samples if s.share in (ALONE, PACK)], [1]
    for n in sizes:
        precision, chosen = _fitting([s for s in groups if members == 1 or s.k == n], spec, resources, what="host")
        if chosen:
            break
    else:
        return None
    source = "records" if any(s.source == "records" for s in chosen) else "bench"
    peak = max(_projected(s, held) for s in chosen)
    devices = sorted({s.device for s in chosen})
    grown = any(held > s.data_images for s in chosen)
    detail = (
        f"{plural(len(chosen), 'peak')} of {spec.model} bs {spec.batch_size}"
        + (f" fused x{n}" if members > 1 else "")
        + f" on {', '.join(devices)}, {precision}"
        + (f", raised for {held:,} images" if grown else "")
        + f": {peak:,.0f} MiB"
    )
    return peak, source, detail, n


def _process_peak(
    spec: RunSpec, resources: Resources, evidence: Evidence, held: int, members: int
) -> tuple[float, str, str]:
    """(peak MiB, source, detail) of the process that trains ``members`` of ``spec``'s runs (more than one: a fused
    group), worked out once per configuration (``Evidence.peaks_memo``)."""
    memo = (spec.model, spec.batch_size, spec.precision, resources.gpus_per_node > 0, held, members)
    if memo in evidence.peaks_memo:
        return evidence.peaks_memo[memo]
    found = _measured(spec, resources, evidence, held, members)
    if found is not None and found[3] > 1:  # a fused group's own peak, scaled up from a smaller group
        peak, source, said, n = found
        if n < members:
            peak = BASE_MB + max(peak - BASE_MB, 0) * members / n
            said += f", part above {BASE_MB} MiB x{members}/{n}"
    else:
        alone = found or _measured(spec, resources, evidence, held, 1)
        if alone is not None:
            peak, source, said, _ = alone
        else:
            (peak, said), source = prior_host_mb(spec, resources, held), "prior"
        if members > 1 and not resources.gpus_per_node:
            peak = BASE_MB + max(peak - BASE_MB, 0) * members
            said += f"; fused x{members}: part above {BASE_MB} MiB x{members}"
        elif members > 1:
            said += f"; fused x{members} on a GPU: one process's host memory"
    evidence.peaks_memo[memo] = (peak, source, said)
    return peak, source, said


def task_memory(
    specs: Sequence[RunSpec],
    resources: Resources,
    evidence: Evidence,
    *,
    fused: bool = False,
    data: Mapping[tuple[str, str], tuple[int, int]] | None = None,
) -> Memory:
    """Pure: the host memory of one array task: ``specs`` alone (one), packed, or ``fused`` as one group."""
    members = len(specs) if fused else 1
    found = [
        _process_peak(spec, resources, evidence, held_images(spec, data), members)
        for spec in (specs[:1] if fused else specs)  # a fused group's members differ only in their seed
    ]
    total = sum(peak for peak, _, _ in found)
    detail = max(found, key=lambda f: f[0])[2]
    if len(found) > 1:
        detail = (
            f"{len(found)} packed runs' peaks ({total:,.0f} MiB) + {SUPERVISOR_MB} MiB for the job; largest: {detail}"
        )
        total += SUPERVISOR_MB
    mb = max(MIN_MEM_MB, math.ceil(total * MEM_MARGIN / MEM_STEP_MB) * MEM_STEP_MB)
    sources = {source for _, source, _ in found}
    source = "prior" if "prior" in sources else "bench" if "bench" in sources else "records"
    return Memory(mb=mb, peak_mb=total, source=source, detail=f"{detail}; x{MEM_MARGIN:g} = {mb / 1024:g} GB")


def gpu_memory_mb(resources: Resources) -> tuple[int, str]:
    """Pure: one GPU's memory (MiB) and what says so: ``gpu_mem_gb``, else ``gpu_type`` by GPU_MEMORY_GB (or a
    size in its name). Raises PlanError where neither says."""
    if resources.gpu_mem_gb is not None:
        return int(resources.gpu_mem_gb * 1024), f"gpu_mem_gb {resources.gpu_mem_gb:g}"
    name = (resources.gpu_type or "").lower()
    sized = re.search(r"[_-](\d+)g", name)  # "a100_80gb", "v100-32g"
    if sized:
        return int(sized.group(1)) * 1024, f"{sized.group(1)} GB ({resources.gpu_type})"
    for key in sorted(GPU_MEMORY_GB, key=len, reverse=True):
        if key in name:
            gb = GPU_MEMORY_GB[key]
            other = f"; set gpu_mem_gb: {TWO_SIZES[key]} for the {TWO_SIZES[key]} GB part" if key in TWO_SIZES else ""
            return gb * 1024, f"{gb} GB ({resources.gpu_type}{other})"
    said = f"gpu_type {resources.gpu_type!r} is not one cifarbench knows the memory of" if name else "no gpu_type"
    raise PlanError(f"pack: auto needs each GPU's memory, and {said}; set slurm.gpu_mem_gb (e.g. 80)")


def _device_peak(spec: RunSpec, resources: Resources, evidence: Evidence) -> tuple[float, str]:
    samples = evidence.memory.get((spec.model, spec.batch_size), ())
    precision, chosen = _fitting([s for s in samples if s.share != FUSE], spec, resources, what="device")
    if not chosen:
        command = MEASURE.format(model=spec.model, batch=spec.batch_size, results=shlex.quote(str(spec.results)))
        raise PlanError(
            f"pack: auto: no GPU memory was measured for {spec.model} at batch size {spec.batch_size} "
            f"({' or '.join(precisions(spec, resources))}); measure it on a GPU node with `{command}`, "
            "or run a one-run grid on one GPU first, then submit again"
        )
    peak = max(s.device_mb for s in chosen if s.device_mb is not None)
    devices = ", ".join(sorted({s.device for s in chosen}))
    return peak, f"{spec.model} bs {spec.batch_size} {precision}: {plural(len(chosen), 'peak')} on {devices}"


def _gain_cap(spec: RunSpec, resources: Resources, evidence: Evidence) -> tuple[int | None, str]:
    """The fewest runs per GPU within GAIN_TOLERANCE of the best aggregate throughput measured (None: no cap)."""
    samples = [s for s in evidence.packs.get((spec.model, spec.batch_size), ()) if s.device != "cpu"]
    for precision in precisions(spec, resources):
        chosen = [s for s in samples if s.precision == precision]
        if chosen:
            break
    else:
        return None, "no packed throughput measured"
    by_k: dict[int, list[float]] = {}
    for s in chosen:
        by_k.setdefault(s.k, []).append(s.images_per_s)
    curve = {k: k * statistics.median(rates) for k, rates in by_k.items()}
    if len(curve) < 2:
        return None, f"throughput measured at {plural(next(iter(curve)), 'run')} per GPU only"
    best = max(curve.values())
    enough = min(k for k, v in curve.items() if v >= (1 - GAIN_TOLERANCE) * best)
    shown = ", ".join(f"{k}: {v:,.0f}" for k, v in sorted(curve.items()))
    if enough == max(curve):
        return None, f"still gaining at {max(curve)} per GPU, the most measured (images/s {shown})"
    return enough, f"no gain past {enough} per GPU (images/s {shown})"


def pack_size(specs: Sequence[RunSpec], resources: Resources, evidence: Evidence) -> PackChoice:
    """Pure: ``pack: auto``'s runs per task for ``specs`` (the runs of one set of resources) on ``resources``'
    GPUs. Raises PlanError where the evidence cannot say."""
    gpus = resources.gpus_per_node
    total_mb, said_gpu = gpu_memory_mb(resources)
    usable = total_mb * (1 - GPU_HEADROOM)
    worst: tuple[float, str, RunSpec] | None = None
    for spec in {(s.model, s.batch_size, s.precision): s for s in specs}.values():
        peak, said = _device_peak(spec, resources, evidence)
        if worst is None or peak > worst[0]:
            worst = (peak, said, spec)
    assert worst is not None, "pack: auto plans at least one run"
    peak, said, spec = worst
    need = peak + CUDA_PROCESS_MB
    per_gpu = int(usable // need)
    if per_gpu < 1:
        raise PlanError(
            f"pack: auto: one run needs {need:,.0f} MiB of GPU memory ({said}: {peak:,.0f} + {CUDA_PROCESS_MB:,} per "
            f"process), more than {1 - GPU_HEADROOM:.0%} of the GPU's {said_gpu}; use a smaller batch_size or a "
            "larger GPU"
        )
    cap, said_gain = _gain_cap(spec, resources, evidence)
    cpus, per_cpus = resources.cpus_per_task, "one per run"
    if resources.exclusive and cpus >= gpus:  # a whole node: as many runs on each of its GPUs
        cpus, per_cpus = cpus - cpus % gpus, f"one per run, {cpus // gpus} per GPU"
    limits = {
        f"memory: {per_gpu * gpus} ({per_gpu} per GPU of {said_gpu}: {said}, {peak:,.0f} + {CUDA_PROCESS_MB:,} MiB "
        f"each, in {1 - GPU_HEADROOM:.0%})": per_gpu * gpus,
        f"CPUs: {cpus} ({per_cpus})": cpus,
        f"runs: {len(specs)}": len(specs),
    }
    if cap is not None:
        limits[f"throughput: {cap * gpus} ({said_gain})"] = cap * gpus
    k = min(limits.values())
    if k < gpus and not (resources.exclusive and k == len(specs)):  # too few runs for the node: describe says so
        raise PlanError(
            f"pack: auto: {plural(k, 'run')} per task would leave some of its {plural(gpus, 'GPU')} idle "
            f"({min(limits, key=limits.__getitem__)}); ask for fewer GPUs per task"
        )
    why = "; ".join(limits) + ("" if cap is not None else f"; throughput: {said_gain}")
    return PackChoice(k=k, detail=f"pack auto: {k} = the least of {why}")
