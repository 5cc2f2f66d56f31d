"""Checks of a grid's SLURM resources against the cluster's limits: the parsers on recorded output of the local
cluster (slurm-wlm 22.05.8, partitions debug and short) and on a hand-made bigger site, the checks on both, and
once against the live cluster.

Recorded files in tests/recorded/, each what its command printed:
  scontrol-show-partition.txt     scontrol --all --oneliner show partition
  scontrol-show-node.txt          scontrol --all --oneliner show node
  sacctmgr-show-user-withassoc.txt, sacctmgr-show-qos.txt, squeue-user-qos.txt: accounting, see tests/test_qos.py
"""

import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

from cifarbench.cli import main
from cifarbench.cluster import inventory, preflight
from cifarbench.cluster.inventory import ClusterError, ClusterLimits, Partition
from cifarbench.cluster.preflight import check_resources
from cifarbench.config.grid import load_grid
from cifarbench.config.resources import Resources
from cifarbench.store.datasets import fingerprint

RECORDED = Path(__file__).parent / "recorded"
PARTITIONS = (RECORDED / "scontrol-show-partition.txt").read_text()
NODES = (RECORDED / "scontrol-show-node.txt").read_text()
USERS = (RECORDED / "sacctmgr-show-user-withassoc.txt").read_text()
QOS = (RECORDED / "sacctmgr-show-qos.txt").read_text()
QUEUED = (RECORDED / "squeue-user-qos.txt").read_text()

# A bigger site, written in scontrol's format: GPU nodes of two kinds, a CPU partition with a per-node CPU cap,
# a partition mixing both, a drained one, an empty one and a hidden one; no default partition.
SITE_PARTITIONS = """\
PartitionName=gpu Default=NO MaxTime=2-00:00:00 MaxCPUsPerNode=UNLIMITED Nodes=g[01-02] State=UP
PartitionName=cpu Default=NO MaxTime=7-00:00:00 MaxCPUsPerNode=32 Nodes=c01 State=UP MaxMemPerNode=128000
PartitionName=mixed Default=NO MaxTime=UNLIMITED Nodes=g01,c01 State=UP
PartitionName=maint Default=NO MaxTime=UNLIMITED Nodes=c01 State=DRAIN
PartitionName=empty Default=NO MaxTime=01:00:00 Nodes=(null) State=UP
PartitionName=secret Default=NO Hidden=YES MaxTime=04:00:00 Nodes=g02 State=UP
"""
SITE_NODES = """\
NodeName=g01 CPUEfctv=62 CPUTot=64 Gres=gpu:a100:4(S:0-1) RealMemory=512000 Partitions=gpu,mixed OS=Linux 5.14 #1 SMP
NodeName=g02 CPUTot=32 Gres=gpu:v100:2,gpu:t4:1,shard:8 RealMemory=192000 Partitions=gpu,secret Reason=Not responding
NodeName=c01 CPUTot=128 Gres=(null) RealMemory=256000 State=MIXED Partitions=cpu,mixed,maint
"""


def _site(**fields) -> ClusterLimits:
    return ClusterLimits(
        partitions=inventory.parse_partitions(SITE_PARTITIONS),
        nodes=tuple(inventory.parse_nodes(SITE_NODES)),
        **fields,
    )


def _local(**fields) -> ClusterLimits:
    return ClusterLimits(
        partitions=inventory.parse_partitions(PARTITIONS),
        nodes=tuple(inventory.parse_nodes(NODES)),
        **fields,
    )


LOCAL_MB = inventory.parse_nodes(NODES)[0].memory_mb


# --- parsers -------------------------------------------------------------------------------------------------


def test_the_local_partitions():
    assert inventory.parse_partitions(PARTITIONS) == {
        "debug": Partition(
            name="debug",
            default=True,
            state="UP",
            max_time=None,
            max_cpus_per_node=None,
            max_mem_per_node_mb=None,
            total_nodes=1,
        ),
        "short": Partition(
            name="short",
            default=False,
            state="UP",
            max_time=1800,
            max_cpus_per_node=None,
            max_mem_per_node_mb=None,
            total_nodes=1,
        ),
    }


def test_the_local_node():
    (node,) = inventory.parse_nodes(NODES)
    assert (node.cpus, node.gpus, node.partitions) == (2, 2, ("debug", "short"))
    assert node.memory_mb > 1000 and f"RealMemory={node.memory_mb} " in NODES


def test_values_with_spaces_stay_whole():
    fields = inventory.parse_fields(SITE_NODES.splitlines()[1])
    assert fields["Reason"] == "Not responding"
    assert fields["Partitions"] == "gpu,secret" and fields["Gres"] == "gpu:v100:2,gpu:t4:1,shard:8"
    assert inventory.parse_fields(SITE_NODES.splitlines()[0])["OS"] == "Linux 5.14 #1 SMP"


@pytest.mark.parametrize(
    "gres, gpus",
    [
        ("gpu:2", 2),
        ("gpu:a100:4", 4),
        ("gpu:a100:4(S:0-1)", 4),
        ("gpu:a100:2(S:0,1),gpu:t4:1(S:1)", 3),
        ("shard:8,gpu:nvidia_a100-sxm4-80gb:8", 8),
        ("mps:400", 0),
        ("(null)", 0),
        ("", 0),
    ],
)
def test_gpus_from_gres(gres, gpus):
    assert inventory.gpu_count(gres) == gpus


def test_a_bigger_site():
    limits = _site()
    assert sorted(limits.partitions) == ["cpu", "empty", "gpu", "maint", "mixed", "secret"]
    assert limits.partitions["gpu"].max_time == 2 * 86400 and limits.partitions["mixed"].max_time is None
    assert limits.partitions["maint"].state == "DRAIN" and limits.partition(None) is None
    nodes = {n.name: n for n in limits.nodes}
    assert (nodes["g01"].cpus, nodes["g01"].gpus, nodes["g02"].gpus, nodes["c01"].gpus) == (62, 4, 3, 0)
    # the partition's caps apply to each node
    assert limits.capacities(limits.partitions["cpu"]) == [(0, 32, 128000)]
    assert limits.capacities(limits.partitions["mixed"]) == [(4, 62, 512000), (0, 128, 256000)]
    assert limits.capacities(limits.partitions["empty"]) == []


# --- read_limits ---------------------------------------------------------------------------------------------


class Binaries:
    """Recorded answers by command name (scontrol's by what its standard input asks); what was called is kept."""

    def __init__(self, **answers: tuple[int, str]):
        self.answers, self.calls = answers, []

    def __call__(self, args: list[str], stdin: str | None = None) -> subprocess.CompletedProcess:
        self.calls.append(args)
        name = f"{args[0]}_{args[args.index('show') + 1]}" if "show" in args else args[0]
        code, out = self.answers[name]
        return subprocess.CompletedProcess(args, code, stdout=out if code == 0 else "", stderr="" if code == 0 else out)


# scontrol reading its commands from standard input echoes each as a prompt line before its answer
SCONTROL = f"scontrol: show partition\n{PARTITIONS}scontrol: show node\n{NODES}scontrol: \n"
RECORDED_BINARIES = dict(
    scontrol=(0, SCONTROL),
    sacctmgr_user=(0, USERS),
    sacctmgr_qos=(0, QOS),
    squeue=(0, QUEUED),
)


def test_a_grid_takes_three_calls_and_one_more_where_a_qos_caps_queued_jobs():
    binaries = Binaries(**RECORDED_BINARIES)
    limits = inventory.read_limits(run=binaries, user="root")
    qos = inventory.parse_qos(QOS)
    assert (limits.accounts, limits.qos, limits.qos_limits, limits.queued) == ({"root"}, set(qos), qos, {"capped": 2})
    assert limits.associations == {"root": inventory.Association(account="root", qos=frozenset({"capped", "normal"}))}
    assert (limits.user, limits.default_account) == ("root", "root")
    assert (limits.partitions, limits.nodes) == (_local().partitions, _local().nodes)
    assert binaries.calls[:1] == [inventory.SCONTROL_CMD]  # partitions and nodes in one
    assert sorted(binaries.calls[1:3]) == sorted([inventory.ASSOCIATIONS_CMD, inventory.QOS_CMD])  # at once
    assert binaries.calls[3:] == [inventory.queued_cmd("root")]
    uncapped = Binaries(**{**RECORDED_BINARIES, "sacctmgr_qos": (0, "normal||||\n")})
    assert inventory.read_limits(run=uncapped, user="root").queued == {} and len(uncapped.calls) == 3


def test_no_account_or_qos_asked_takes_one():
    binaries = Binaries(**RECORDED_BINARIES)
    assert inventory.read_limits(run=binaries, accounting=False) == _local()
    assert binaries.calls == [inventory.SCONTROL_CMD]


@pytest.mark.parametrize(
    "sacctmgr",
    [
        (1, "sacctmgr: error: You are not running a supported accounting_storage plugin"),
        (1, "sacctmgr: error: Problem talking to the database: Connection refused"),
        (0, ""),
    ],
)
def test_without_accounting_accounts_and_qos_are_not_known(sacctmgr):
    limits = inventory.read_limits(
        run=Binaries(**{**RECORDED_BINARIES, "sacctmgr_user": sacctmgr, "sacctmgr_qos": sacctmgr})
    )
    assert limits.accounts is None and limits.qos is None and "short" in limits.partitions
    assert check_resources(Resources(account="anything", qos="any", cpus_per_task=1), limits) == []


def test_a_cluster_that_does_not_answer_is_one_clear_error():
    said = "slurm_load_partitions error: Unable to contact slurm controller (connect failure)"
    binaries = Binaries(**{**RECORDED_BINARIES, "scontrol": (1, said)})
    with pytest.raises(ClusterError) as e:
        inventory.read_limits(run=binaries)
    assert str(e.value) == (
        f"cannot read the cluster's limits: `scontrol --all --oneliner` (show partition, show node) failed ({said}); "
        "check that SLURM answers with `scontrol ping`"
    )


def test_without_slurm_installed(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    said = r"`scontrol --all --oneliner` \(show partition, show node\) failed \(.*No such file"
    with pytest.raises(ClusterError, match=said):
        inventory.read_limits()


# --- checks --------------------------------------------------------------------------------------------------

FITS = dict(gpus_per_node=2, cpus_per_task=2, mem_gb=19.5, time="00:30:00")


@pytest.mark.parametrize("partition", [None, "debug", "short"])
def test_what_the_node_has_fits(partition):
    limits = _local(accounts=frozenset({"root"}), qos=frozenset({"normal"}))
    assert check_resources(Resources(partition=partition, account="root", qos="normal", **FITS), limits) == []
    small = Resources(partition=partition, gpus_per_node=0, cpus_per_task=1, time="00:01:00")
    assert check_resources(small, limits) == []


def test_an_unknown_partition_has_a_did_you_mean():
    assert check_resources(Resources(partition="shrt", **FITS), _local()) == [
        "slurm.partition: no partition 'shrt' on this cluster (did you mean 'short'?); partitions: debug, short"
    ]


def test_a_time_limit_longer_than_the_partitions():
    assert check_resources(Resources(partition="short", **{**FITS, "time": "00:30:01"}), _local()) == [
        'slurm.time: "00:30:01" is longer than partition \'short\' allows; set it to at most "00:30:00", '
        "or use a partition where it fits: debug"
    ]
    assert check_resources(Resources(**{**FITS, "time": "30-00:00:00"}), _local()) == []  # debug: no limit
    assert check_resources(Resources(partition="gpu", time="2-00:00:01"), _site()) == [
        'slurm.time: "2-00:00:01" is longer than partition \'gpu\' allows; set it to at most "2-00:00:00", '
        "or use a partition where it fits: mixed"
    ]


def test_more_than_the_largest_node():
    asked = Resources(gpus_per_node=3, cpus_per_task=4, mem_gb=20)
    gb = LOCAL_MB * 10 // 1024 / 10
    assert check_resources(asked, _local()) == [
        "slurm.gpus_per_node: 3, but the nodes of the default partition 'debug' have at most 2 GPUs; ask for at most 2",
        "slurm.cpus_per_task: 4, but the nodes of the default partition 'debug' have at most 2 CPUs; ask for at most 2",
        f"slurm.mem_gb: 20, but the nodes of the default partition 'debug' have at most {gb:g} GB ({LOCAL_MB} MB); "
        f"ask for at most {gb:g}",
    ]
    assert check_resources(Resources(**{**FITS, "mem_gb": gb}), _local()) == []


def test_memory_is_counted_as_submitit_asks_for_it():
    # submitit writes mem_gb as GB (1024 MB), or as whole MB when it is not whole
    exact = LOCAL_MB / 1024
    assert check_resources(Resources(**{**FITS, "mem_gb": exact}), _local()) == []
    assert len(check_resources(Resources(**{**FITS, "mem_gb": exact + 1 / 1024}), _local())) == 1


def test_unknown_account_and_qos():
    limits = _local(accounts=frozenset({"root", "physics"}), qos=frozenset({"normal", "long"}))
    assert check_resources(Resources(account="phsyics", qos="norml", **FITS), limits) == [
        "slurm.account: unknown account 'phsyics' (did you mean 'physics'?); known: physics, root",
        "slurm.qos: unknown QOS 'norml' (did you mean 'normal'?); known: long, normal",
    ]
    many = frozenset(f"acct{i:02d}" for i in range(30))
    (line,) = check_resources(Resources(account="zzz", **FITS), _local(accounts=many))
    assert line == "slurm.account: unknown account 'zzz'; known: " + ", ".join(sorted(many)[:10]) + ", ... (30 in all)"


def test_no_partition_and_no_default():
    assert check_resources(Resources(gpus_per_node=0, cpus_per_task=1), _site()) == [
        "slurm.partition: not set, and the cluster has no default partition; "
        "set it to one of: cpu, empty, gpu, maint, mixed, secret"
    ]


def test_a_drained_or_empty_partition():
    asked = dict(gpus_per_node=0, cpus_per_task=8, time="01:00:00")
    assert check_resources(Resources(partition="maint", **asked), _site()) == [
        "slurm.partition: partition 'maint' is DRAIN and takes no jobs; choose another: cpu, gpu, mixed, secret"
    ]
    assert check_resources(Resources(partition="empty", **asked), _site()) == [
        "slurm.partition: partition 'empty' has no nodes; choose another: cpu, gpu, mixed, secret"
    ]


def test_gpus_on_a_cpu_partition_and_its_cpu_cap():
    assert check_resources(Resources(partition="cpu", gpus_per_node=1, cpus_per_task=48), _site()) == [
        "slurm.gpus_per_node: 1, but the nodes of partition 'cpu' have no GPUs; set it to 0, "
        "or use a partition where it fits: gpu, mixed",
        "slurm.cpus_per_task: 48, but the nodes of partition 'cpu' have at most 32 CPUs; ask for at most 32, "
        "or use a partition where it fits: gpu, mixed",
    ]


def test_no_node_has_it_all_at_once():
    # 4 GPUs on g01 and 100 CPUs on c01, but never both on one node
    assert check_resources(Resources(partition="mixed", gpus_per_node=4, cpus_per_task=100), _site()) == [
        "slurm: no node of partition 'mixed' has 4 GPUs and 100 CPUs at once; ask for less of one"
    ]
    # 100 CPUs on c01 and 400 GB on g01
    asked = Resources(partition="mixed", gpus_per_node=0, cpus_per_task=100, mem_gb=400)
    assert check_resources(asked, _site()) == [
        "slurm: no node of partition 'mixed' has 0 GPUs, 100 CPUs and 400 GB at once; ask for less of one"
    ]


def test_cap_time():
    short = _local().partitions["short"]
    assert preflight.cap_time(600, short) == (600, False)
    assert preflight.cap_time(1800, short) == (1800, False)
    assert preflight.cap_time(7200, short) == (1800, True)
    assert preflight.cap_time(10**7, _local().partitions["debug"]) == (10**7, False)


# --- the data ---------------------------------------------------------------------------------------------------


def test_the_missing_data_hint_writes_the_data_the_grids_runs_read_again(tmp_path, write_records, capsys):
    root = tmp_path / "data"
    made = ["data", "synthetic", "--root", str(root), "--dataset", "synthetic10", "--train-size", "300"]
    assert main([*made, "--test-size", "50"]) == 0
    results = write_records([{"dataset": "synthetic10", "train_images": 300, "test_images": 50}])
    grid = tmp_path / "grid.yaml"
    grid.write_text(
        f"models: [resnet20]\ndatasets: [synthetic10]\nopts: [step-160]\nepochs: 1\nbatch_sizes: [64]\n"
        f"seeds: [0, 1]\nroot: {root}\nresults: {results}\nslurm: {{gpus_per_node: 0, cpus_per_task: 1}}\n"
    )
    ids = [s.run_id for s in load_grid(grid, fingerprint=fingerprint).specs]
    shutil.rmtree(root)
    capsys.readouterr()
    assert main(["submit", str(grid), "--executor", "local", "--dry-run"]) == 2
    err = capsys.readouterr().err
    hint = re.search(r"dataset synthetic10 not found in .*; run `(.*)`, the size 1 run recorded in .* read; ", err)
    assert hint, err
    assert hint[1] == f"cifarbench data synthetic --root {root} --dataset synthetic10 --train-size 300 --test-size 50"
    assert main(shlex.split(hint[1])[1:]) == 0
    assert [s.run_id for s in load_grid(grid, fingerprint=fingerprint).specs] == ids  # the same data again


# --- the live cluster ----------------------------------------------------------------------------------------


@pytest.mark.slurm
def test_the_live_cluster_limits():
    if not shutil.which("scontrol"):
        pytest.skip("SLURM is not installed")
    ping = subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30)
    if "UP" not in ping.stdout:
        pytest.skip("the SLURM cluster is not answering; start it with `bash slurm/cluster.sh up`")
    limits = inventory.read_limits()
    debug, short = limits.partitions["debug"], limits.partitions["short"]
    assert limits.partition(None) is debug and debug.max_time is None
    assert short.max_time == 30 * 60 and not short.default
    assert all(limits.capacities(p) for p in (debug, short)) and limits.accounts and "root" in limits.accounts
    assert check_resources(Resources(partition="short", gpus_per_node=1, cpus_per_task=1, time="00:31:00"), limits)
