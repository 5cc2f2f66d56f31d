"""Preflight's checks of what a run asks of a node: GPU types, node features (slurm.constraint) and node states. The
parsers and checks on recorded output of the local cluster (a node vm with two a100 GPUs and the features ib and
localdisk; a partition spare whose two v100 nodes are down) and on a hand-made site in every state, the constraint
expressions against what sbatch answered, and once against the live cluster.

Recorded files in tests/recorded/, each what its command printed on the local cluster:
  scontrol-show-node-spare.txt        scontrol --all --oneliner show node
  scontrol-show-partition-spare.txt   scontrol --all --oneliner show partition
"""

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cifarbench.cli import main
from cifarbench.cluster import inventory, preflight
from cifarbench.cluster.inventory import ClusterLimits, parse_constraint, satisfies
from cifarbench.cluster.preflight import check_resources
from cifarbench.config.resources import Resources
from cifarbench.store.manifests import read_manifests

RECORDED = Path(__file__).parent / "recorded"
LOCAL = ClusterLimits(
    partitions=inventory.parse_partitions((RECORDED / "scontrol-show-partition-spare.txt").read_text()),
    nodes=tuple(inventory.parse_nodes((RECORDED / "scontrol-show-node-spare.txt").read_text())),
)

# A site in scontrol's format, its nodes in the states a busy cluster shows: partition gpu has six nodes, of which
# one runs jobs (MIXED), one is powered down (resumed for a job), two are drained or draining, one is down and
# g06 is FUTURE, which scontrol does not list; cpu has a node reserved and one whose KNL mode is available, not
# active; old has GPUs of no type, one node failing; soon has only FUTURE nodes.
SITE_PARTITIONS = """\
PartitionName=gpu Default=YES MaxTime=2-00:00:00 Nodes=g[01-06] State=UP TotalCPUs=334 TotalNodes=6
PartitionName=cpu Default=NO MaxTime=7-00:00:00 Nodes=c[01-02] State=UP TotalCPUs=256 TotalNodes=2
PartitionName=old Default=NO MaxTime=UNLIMITED Nodes=k[01-02] State=UP TotalCPUs=32 TotalNodes=2
PartitionName=soon Default=NO MaxTime=UNLIMITED Nodes=f[01-04] State=UP TotalCPUs=0 TotalNodes=4
"""
SITE_NODES = """\
NodeName=g01 CPUEfctv=62 CPUTot=64 AvailableFeatures=ib,nvlink ActiveFeatures=ib,nvlink Gres=gpu:a100:4(S:0-1) RealMemory=512000 State=MIXED Partitions=gpu
NodeName=g02 CPUTot=32 AvailableFeatures=ib ActiveFeatures=ib Gres=gpu:a100:2,gpu:v100:2,shard:8 RealMemory=192000 State=MIXED+DRAIN Partitions=gpu Reason=bad dimm [root@2026-12-01T10:00:00]
NodeName=g03 CPUTot=96 AvailableFeatures=ib,h100,localdisk ActiveFeatures=ib,h100,localdisk Gres=gpu:h100:8(S:0-1) RealMemory=1024000 State=IDLE+POWERED_DOWN Partitions=gpu
NodeName=g04 CPUTot=96 AvailableFeatures=ib,h100 ActiveFeatures=ib,h100 Gres=gpu:h100:8(S:0-1) RealMemory=1024000 State=DOWN+DRAIN+NOT_RESPONDING Partitions=gpu Reason=Not responding
NodeName=g05 CPUTot=48 AvailableFeatures=l40s ActiveFeatures=l40s Gres=gpu:l40s:4 RealMemory=384000 State=IDLE+DRAIN Partitions=gpu Reason=maintenance
NodeName=c01 CPUTot=128 AvailableFeatures=avx512 ActiveFeatures=avx512 Gres=(null) RealMemory=256000 State=ALLOCATED Partitions=cpu
NodeName=c02 CPUTot=128 AvailableFeatures=avx512,quad,snc4 ActiveFeatures=avx512,quad Gres=(null) RealMemory=256000 State=IDLE+RESERVED Partitions=cpu
NodeName=k01 CPUTot=16 AvailableFeatures=(null) ActiveFeatures=(null) Gres=gpu:2 RealMemory=64000 State=IDLE Partitions=old
NodeName=k02 CPUTot=16 AvailableFeatures=(null) ActiveFeatures=(null) Gres=gpu:2 RealMemory=64000 State=IDLE+FAIL Partitions=old
"""  # noqa: E501
SITE = ClusterLimits(
    partitions=inventory.parse_partitions(SITE_PARTITIONS), nodes=tuple(inventory.parse_nodes(SITE_NODES))
)

ASK = dict(gpus_per_node=1, cpus_per_task=1, mem_gb=1, time="00:10:00")


# --- parsers -------------------------------------------------------------------------------------------------


def test_the_local_nodes():
    nodes = {n.name: n for n in LOCAL.nodes}
    vm, spare1 = nodes["vm"], nodes["spare1"]
    assert (vm.gpus, vm.gpu_types, vm.features, vm.able) == (2, {"a100": 2}, {"ib", "localdisk"}, True)
    assert (spare1.gpu_types, spare1.features, spare1.able) == ({"v100": 1}, {"spare"}, False)
    assert spare1.partitions == ("spare",)
    assert spare1.state.startswith("DOWN")  # DOWN+NOT_RESPONDING: its slurmd never answers
    assert {name: p.total_nodes for name, p in LOCAL.partitions.items()} == {"debug": 1, "short": 1, "spare": 2}


@pytest.mark.parametrize(
    "gres, types",
    [
        ("gpu:2", {"": 2}),
        ("gpu:a100:4(S:0-1)", {"a100": 4}),
        ("gpu:a100:2(S:0,1),gpu:t4:1(S:1)", {"a100": 2, "t4": 1}),
        ("gpu:a100:2,gpu:v100:2,shard:8", {"a100": 2, "v100": 2}),
        ("gpu:a100:1,gpu:a100:1", {"a100": 2}),
        ("shard:8,gpu:nvidia_a100-sxm4-80gb:8", {"nvidia_a100-sxm4-80gb": 8}),
        ("mps:400", {}),
        ("(null)", {}),
    ],
)
def test_gpu_types_from_gres(gres, types):
    assert inventory.gpu_types(gres) == types


def test_features_are_the_available_ones():
    # c02's KNL modes: snc4 is available, not active; a job asking for it reboots the node into it
    nodes = {n.name: n for n in SITE.nodes}
    assert nodes["c02"].features == {"avx512", "quad", "snc4"} and nodes["k01"].features == frozenset()
    assert check_resources(Resources(partition="cpu", gpus_per_node=0, cpus_per_task=64, constraint="snc4"), SITE) == []


@pytest.mark.parametrize(
    "state, able",
    [
        ("IDLE", True),
        ("MIXED", True),
        ("ALLOCATED+COMPLETING", True),
        ("IDLE+POWERED_DOWN", True),  # resumed for a job
        ("IDLE+CLOUD+POWERED_DOWN", True),
        ("POWERED_DOWN", True),
        ("IDLE+RESERVED", True),  # a reservation ends
        ("MIXED+MAINTENANCE", True),
        ("IDLE+NOT_RESPONDING", True),  # back, or DOWN within SlurmdTimeout
        ("UNKNOWN", True),
        ("", True),
        ("DOWN", False),
        ("DOWN*", False),  # older scontrol
        ("DOWN+NOT_RESPONDING", False),
        ("IDLE+DRAIN", False),
        ("MIXED+DRAIN", False),  # draining: runs its jobs, takes no new ones
        ("DOWN+DRAIN", False),
        ("DRAINED", False),
        ("FUTURE", False),
        ("IDLE+FAIL", False),
        ("IDLE+INVALID_REG", False),
    ],
)
def test_node_states(state, able):
    node = inventory.Node(name="n", cpus=1, memory_mb=1, gpus=0, partitions=(), state=state)
    assert node.able is able


# --- constraint expressions ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, parsed",
    [
        ("ib", "ib"),
        ("ib&localdisk", ("&", "ib", "localdisk")),
        ("ib,localdisk", ("&", "ib", "localdisk")),
        ("a|b&c", ("&", ("|", "a", "b"), "c")),  # no precedence: left to right
        ("a|(b&c)", ("|", "a", ("&", "b", "c"))),
        ("[rack1|rack2]", ("|", "rack1", "rack2")),
        ("ib&[rack1|rack2]", ("&", "ib", ("|", "rack1", "rack2"))),
        ("gpu*2&ib", ("&", "gpu", "ib")),
        ("[(a|b)*1&c*2]", ("&", ("|", "a", "b"), "c")),
        ("ib|", "ib"),
    ],
)
def test_constraints_parse_as_sbatch_reads_them(text, parsed):
    assert parse_constraint(text) == parsed


@pytest.mark.parametrize(
    "text, why",
    [
        ("ib&&localdisk", "'&' follows no feature"),
        ("|ib", "'|' follows no feature"),
        ("(ib", "no ')'"),
        ("ib)", "')' closes nothing"),
        ("ib(localdisk)", "no operator before '('"),
        ("()", "an empty group"),
        ("a*b", '"*" is a node count'),
    ],
)
def test_what_is_no_constraint(text, why):
    with pytest.raises(ValueError, match=re.escape(why)):
        parse_constraint(text)


@pytest.mark.parametrize(
    "text, runs",
    [
        ("ib,localdisk", True),
        ("ib,spare", False),
        ("ib|spare", True),
        ("[ib|spare]", True),
        ("ib&(localdisk|spare)", True),
        ("localdisk|ib&spare", False),  # (localdisk|ib)&spare
        ("spare&ib|localdisk", True),  # (spare&ib)|localdisk
        ("localdisk|(ib&spare)", True),
        ("ib*2", True),
    ],
)
def test_constraints_match_a_node_as_sbatch_said(text, runs):
    # what `sbatch --test-only -p debug -C TEXT` answered on the local cluster: a start time on vm, or "Requested
    # node configuration is not available"
    assert satisfies(parse_constraint(text), frozenset({"ib", "localdisk"})) is runs


# --- checks on the local cluster -----------------------------------------------------------------------------


def test_a_typed_gpu_and_features_the_node_has():
    assert check_resources(Resources(gpu_type="a100", constraint="ib&localdisk", **ASK), LOCAL) == []
    assert check_resources(Resources(partition="short", gpu_type="a100", gpus_per_node=2, cpus_per_task=2), LOCAL) == [
        'slurm.time: "04:00:00" is longer than partition \'short\' allows; set it to at most "00:30:00", '
        "or use a partition where it fits: debug"
    ]


def test_a_partition_whose_nodes_are_all_down():
    assert check_resources(Resources(partition="spare", **ASK), LOCAL) == [
        "slurm.partition: partition 'spare' has no node that takes jobs: 2 nodes down or drained "
        "(spare1 DOWN+NOT_RESPONDING, spare2 DOWN+NOT_RESPONDING); choose another: debug, short"
    ]


def test_an_unknown_gpu_type_or_feature():
    assert check_resources(Resources(gpu_type="h100", **ASK), LOCAL) == [
        "slurm.gpu_type: no node of the default partition 'debug' has GPUs of type 'h100' (did you mean 'a100'?); "
        "GPU types there: a100"
    ]
    # spare is a feature of the cluster, but not of a node of debug
    assert check_resources(Resources(constraint="ib&(localdsik|spare)", **ASK), LOCAL) == [
        "slurm.constraint: no node of the default partition 'debug' has feature 'localdsik' (did you mean "
        "'localdisk'?); features there: ib, localdisk",
        "slurm.constraint: no node of the default partition 'debug' has feature 'spare'; features there: ib, localdisk",
    ]
    assert check_resources(Resources(constraint="ib&&localdisk", **ASK), LOCAL) == [
        "slurm.constraint: 'ib&&localdisk' is not a feature expression ('&' follows no feature); join feature "
        'names with "&" (and) or "|" (or), grouped by "( )"'
    ]


def test_more_gpus_of_the_type_than_a_node_has():
    assert check_resources(Resources(gpu_type="a100", **{**ASK, "gpus_per_node": 3}), LOCAL) == [
        "slurm.gpus_per_node: 3, but the nodes of the default partition 'debug' have at most 2 a100 GPUs; "
        "ask for at most 2"
    ]


# --- checks on a bigger site ---------------------------------------------------------------------------------


def test_only_the_nodes_that_take_jobs_count():
    gpu = SITE.partitions["gpu"]
    assert gpu.total_nodes == 6 and len(SITE.nodes_of(gpu)) == 5
    assert SITE.capacities(gpu) == [(4, 62, 512000), (8, 96, 1024000)]  # g01 and g03
    assert SITE.capacities(gpu, "a100") == [(4, 62, 512000), (0, 96, 1024000)]
    assert SITE.capacities(gpu, "h100") == [(0, 62, 512000), (8, 96, 1024000)]
    assert check_resources(Resources(gpus_per_node=8, gpu_type="h100", cpus_per_task=96), SITE) == []
    assert check_resources(Resources(gpus_per_node=4, gpu_type="a100", cpus_per_task=62), SITE) == []


def test_a_gpu_type_on_nodes_that_take_no_jobs():
    for gpu_type in ("v100", "l40s"):
        assert check_resources(Resources(gpu_type=gpu_type), SITE) == [
            f"slurm.gpu_type: the nodes of the default partition 'gpu' with {gpu_type} GPUs are down or drained"
        ]


def test_a_gpu_type_where_the_gpus_have_none_or_there_are_none():
    assert check_resources(Resources(partition="old", gpu_type="a100"), SITE) == [
        "slurm.gpu_type: no node of partition 'old' has GPUs of type 'a100'; GPU types there: none (its GPUs have no "
        "type); partitions where it fits: gpu"
    ]
    assert check_resources(Resources(partition="cpu", gpu_type="h100", gpus_per_node=8), SITE) == [
        "slurm.gpu_type: no node of partition 'cpu' has GPUs of type 'h100'; GPU types there: none; partitions where "
        "it fits: gpu"
    ]
    assert check_resources(Resources(partition="old", gpus_per_node=2, cpus_per_task=16), SITE) == []  # any GPU


def test_features_no_node_has_at_once_or_with_the_gpus():
    assert check_resources(Resources(constraint="nvlink&localdisk"), SITE) == [
        "slurm.constraint: 'nvlink&localdisk' matches no node of the default partition 'gpu'; the features of its "
        "nodes: h100&ib, h100&ib&localdisk, ib, ib&nvlink, l40s"
    ]
    assert check_resources(Resources(constraint="l40s|ib&nvlink"), SITE) == []  # (l40s|ib)&nvlink: g01
    assert check_resources(Resources(constraint="l40s"), SITE) == [
        "slurm.constraint: the nodes of the default partition 'gpu' that match 'l40s' are down or drained"
    ]
    # a100 GPUs on g01, localdisk on g03
    assert check_resources(Resources(gpus_per_node=4, gpu_type="a100", constraint="ib&localdisk"), SITE) == [
        "slurm: no node of the default partition 'gpu' that matches constraint 'ib&localdisk' has 4 a100 GPUs and "
        "4 CPUs at once; ask for less, or loosen the constraint"
    ]
    asked = dict(gpus_per_node=0, cpus_per_task=64, constraint="avx512")
    assert check_resources(Resources(partition="old", **asked), SITE) == [
        "slurm.constraint: no node of partition 'old' has feature 'avx512'; features there: none; partitions where "
        "it fits: cpu"
    ]


def test_a_partition_of_future_nodes():
    assert check_resources(Resources(partition="soon", gpus_per_node=0, cpus_per_task=8), SITE) == [
        "slurm.partition: partition 'soon' has no node that takes jobs: 4 nodes down or drained (4 FUTURE); "
        "choose another: cpu, gpu, old"
    ]


def test_a_note_for_each_partition_with_some_nodes_down():
    runs = [Resources(), Resources(partition="gpu"), Resources(partition="old"), Resources(partition="cpu")]
    assert preflight.node_notes(runs, SITE) == [
        "note: 4 of 6 nodes of partition 'gpu' are down or drained (g02 MIXED+DRAIN, g04 DOWN+DRAIN+NOT_RESPONDING, "
        "g05 IDLE+DRAIN, 1 FUTURE); only the other 2 nodes can take its runs",
        "note: 1 of 2 nodes of partition 'old' are down or drained (k02 IDLE+FAIL); only the other 1 node can take "
        "its runs",
    ]
    assert preflight.node_notes([Resources(partition="spare"), Resources()], LOCAL) == []  # spare is refused


def test_gpus_on_drained_nodes_keep_the_default_gpu():
    # the partition has GPUs, though none takes jobs now: runs wait for them rather than train on CPUs
    limits = ClusterLimits(
        partitions=inventory.parse_partitions("PartitionName=mix Default=YES Nodes=g1,c1 State=UP TotalNodes=2\n"),
        nodes=tuple(
            inventory.parse_nodes(
                "NodeName=g1 CPUTot=8 Gres=gpu:a100:1 RealMemory=8000 State=IDLE+DRAIN Partitions=mix\n"
                "NodeName=c1 CPUTot=8 Gres=(null) RealMemory=8000 State=IDLE Partitions=mix\n"
            )
        ),
    )
    asked, said = preflight.without_gpus({"r": Resources()}, limits)
    assert asked == {"r": Resources()} and said == []
    assert check_resources(Resources(cpus_per_task=1), limits) == [
        "slurm.gpus_per_node: 1, but the nodes of the default partition 'mix' have no GPUs; set it to 0"
    ]


# --- the live cluster ----------------------------------------------------------------------------------------

GRID = """\
models: [resnet20, resnet32, resnet44]
datasets: [synthetic10]
opts: [step-160]
batch_sizes: [64]
seeds: [0]
epochs: 1
precision: 32-true
root: {root}
results: {results}
slurm: {{gpus_per_node: 1, cpus_per_task: 1, mem_gb: 1, time: "00:05:00"{more}}}
"""


def _live_cluster() -> None:
    if not shutil.which("sbatch"):
        pytest.skip("SLURM is not installed")
    if "UP" not in subprocess.run(["scontrol", "ping"], capture_output=True, text=True, timeout=30).stdout:
        pytest.skip("the SLURM cluster is not answering; start it with `bash slurm/cluster.sh up`")


def _queue() -> set[str]:
    return set(subprocess.run(["squeue", "-h", "-r", "-o", "%i"], capture_output=True, text=True).stdout.split())


@pytest.mark.slurm
def test_the_cluster_refuses_down_nodes_an_unknown_gpu_type_and_feature_before_queueing(
    tmp_path, synthetic_root, capsys
):
    _live_cluster()
    path = tmp_path / "grid.yaml"
    rules = (
        "resources:\n"
        "  - {match: {model: resnet20}, partition: spare}\n"
        "  - {match: {model: resnet32}, gpu_type: h100}\n"
        '  - {match: {model: resnet44}, constraint: "ib&localdsik"}\n'
    )
    path.write_text(GRID.format(root=synthetic_root, results=tmp_path / "results", more="") + rules)
    before = _queue()
    assert main(["submit", str(path), "--dry-run"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert all(line.startswith("cifarbench: error: ") for line in err), err
    errors = [line.removeprefix("cifarbench: error: ") for line in err]
    assert re.fullmatch(
        r"slurm\.partition: partition 'spare' has no node that takes jobs: 2 nodes down or drained \(spare1 DOWN\S*, "
        r"spare2 DOWN\S*\); choose another: debug, short",
        errors[0],
    ), errors
    assert errors[1:] == [
        "slurm.gpu_type: no node of the default partition 'debug' has GPUs of type 'h100' (did you mean 'a100'?); "
        "GPU types there: a100",
        "slurm.constraint: no node of the default partition 'debug' has feature 'localdsik' (did you mean "
        "'localdisk'?); features there: ib, localdisk",
        "nothing was submitted (--no-preflight skips these checks)",
    ]
    assert _queue() == before


@pytest.mark.slurm
@pytest.mark.extended
def test_a_typed_gpu_and_features_are_what_sbatch_is_asked_for(tmp_path, synthetic_root, capsys):
    _live_cluster()
    path, results = tmp_path / "grid.yaml", tmp_path / "results"
    more = ', gpu_type: a100, constraint: "ib&localdisk", extra: {hold: true}'
    path.write_text(GRID.format(root=synthetic_root, results=results, more=more).replace(", resnet32, resnet44", ""))
    assert main(["submit", str(path)]) == 0
    (array,) = {e["array_job_id"] for e in read_manifests(results).values()}
    try:
        job = subprocess.run(["scontrol", "show", "job", "-o", array], capture_output=True, text=True, check=True)
        fields = dict(re.findall(r"(\w+)=(\S*)", job.stdout.splitlines()[0]))
        assert (fields["Features"], fields["TresPerNode"], fields["Partition"]) == (
            "ib&localdisk",
            "gres:gpu:a100:1",
            "debug",
        )
        # the scheduler would start the very script submitit wrote on vm, the node with both
        (script,) = results.rglob("*_submission.sh")
        test = subprocess.run(["sbatch", "--test-only", str(script)], capture_output=True, text=True, timeout=60)
        assert re.search(r"to start at \S+ using \d+ processors on nodes vm in partition debug", test.stderr), test
    finally:
        subprocess.run(["scancel", array], check=False)
