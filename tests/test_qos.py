"""The submitting user's associations and their QOS limits: the parsers on recorded output of the local cluster
(QOS ``capped``, which ``slurm/cluster.sh up`` adds) and on a hand-made bigger site, the checks and the throttle on
both, and ``submit`` against the live cluster.

Recorded files in tests/recorded/, each what its command printed:
  sacctmgr-show-user-withassoc.txt  sacctmgr --noheader --parsable2 show user withassoc
                                        format=user,defaultaccount,account,qos,defaultqos
  sacctmgr-show-qos.txt             sacctmgr --noheader --parsable2 show qos
                                        format=name,maxwall,maxsubmitpu,maxjobspu,maxtrespu
  squeue-user-qos.txt               squeue --noheader --array --user root --format %q  (one held array of 2 tasks)
"""

import dataclasses
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from cifarbench.cli import main
from cifarbench.cluster import inventory, plan, preflight
from cifarbench.cluster.estimate import Evidence
from cifarbench.cluster.inventory import Association, ClusterLimits, Qos
from cifarbench.cluster.preflight import check_resources
from cifarbench.config.resources import Resources
from cifarbench.config.spec import RunSpec, get_recipe

RECORDED = Path(__file__).parent / "recorded"
PARTITIONS = (RECORDED / "scontrol-show-partition.txt").read_text()
NODES = (RECORDED / "scontrol-show-node.txt").read_text()
USERS = (RECORDED / "sacctmgr-show-user-withassoc.txt").read_text()
QOS = (RECORDED / "sacctmgr-show-qos.txt").read_text()
QUEUED = (RECORDED / "squeue-user-qos.txt").read_text()

# A bigger site, in sacctmgr's format: alice has two accounts (physics her default, with an association for one
# partition too), bob's chem is not hers; QOS with every kind of limit, memory and typed GPUs among the TRES.
SITE_USERS = """\
alice|physics|physics|gpu-long,normal|normal
alice|physics|physics|debug,normal|
alice|physics|bio|high,normal|
bob|chem|chem|normal|normal
carol|chem|chem|normal|
"""
SITE_QOS = """\
normal|2-00:00:00|100|20|cpu=64,gres/gpu=8
gpu-long|7-00:00:00|10|2|cpu=16,gres/gpu=4,mem=256G
high||||
debug|00:30:00|2|1|gres/gpu:a100=2,node=1
"""


def _limits(users: str = USERS, qos: str = QOS, queued: str = "", user: str = "root") -> ClusterLimits:
    accounts, mine, default_account = inventory.parse_associations(users, user)
    every = inventory.parse_qos(qos)
    return ClusterLimits(
        partitions=inventory.parse_partitions(PARTITIONS),
        nodes=tuple(inventory.parse_nodes(NODES)),
        accounts=accounts,
        qos=frozenset(every),
        user=user,
        associations=mine or None,
        default_account=default_account,
        qos_limits=every,
        queued=inventory.parse_queued(queued),
    )


def _site(queued: str = "") -> ClusterLimits:
    return _limits(SITE_USERS, SITE_QOS, queued, user="alice")


def _tasks(resources: Resources, runs: int) -> list[plan.Task]:
    specs = [
        RunSpec(model="resnet20", dataset="cifar10", recipe=get_recipe("step-200"), batch_size=64, seed=seed)
        for seed in range(runs)
    ]
    return plan.make_tasks(specs, {s.run_id: resources for s in specs}, {}, Evidence.none())


CPU = dict(gpus_per_node=0, cpus_per_task=1, time="00:15:00")


# --- parsers -------------------------------------------------------------------------------------------------


def test_the_local_associations_and_qos():
    accounts, mine, default = inventory.parse_associations(USERS, "root")
    assert (accounts, default) == ({"root"}, "root")
    assert mine == {"root": Association(account="root", qos=frozenset({"capped", "normal"}))}
    assert mine["root"].given_qos == "normal"  # two QOS and no default: slurmctld's "normal"
    assert inventory.parse_qos(QOS) == {
        "normal": Qos(name="normal"),
        "capped": Qos(name="capped", max_wall=20 * 60, max_submit=3, max_jobs=1, max_tres={"gres/gpu": 1}),
    }
    assert inventory.parse_queued(QUEUED) == {"capped": 2}  # an array's pending tasks one each


def test_a_site_with_several_users_accounts_and_qos():
    accounts, mine, default = inventory.parse_associations(SITE_USERS, "Alice")  # names are kept in lower case
    assert (accounts, default) == ({"physics", "bio", "chem"}, "physics")
    assert mine == {
        "physics": Association(account="physics", qos=frozenset({"gpu-long", "debug", "normal"}), default_qos="normal"),
        "bio": Association(account="bio", qos=frozenset({"high", "normal"})),
    }
    assert inventory.parse_associations(SITE_USERS, "dave") == ({"physics", "bio", "chem"}, {}, None)
    qos = inventory.parse_qos(SITE_QOS)
    assert qos["gpu-long"] == Qos(
        name="gpu-long",
        max_wall=7 * 86400,
        max_submit=10,
        max_jobs=2,
        max_tres={"cpu": 16, "gres/gpu": 4, "mem": 256 * 1024},
    )
    assert qos["high"] == Qos(name="high") and qos["debug"].max_tres == {"gres/gpu:a100": 2, "node": 1}


@pytest.mark.parametrize(
    "text, tres",
    [
        ("cpu=16,gres/gpu=4", {"cpu": 16, "gres/gpu": 4}),
        ("gres/gpu:a100=2", {"gres/gpu:a100": 2}),
        ("mem=500M,mem=2T", {"mem": 2 * 1024**2}),
        ("billing=100,fs/disk=1G", {"billing": 100, "fs/disk": 1024}),
        ("", {}),
    ],
)
def test_tres_lists(text, tres):
    assert inventory.parse_tres(text) == tres


def test_unlimited_and_empty_fields_are_no_limit():
    assert inventory.parse_qos("q|UNLIMITED|UNLIMITED||\n\n") == {"q": Qos(name="q")}


# --- accounts and QOS --------------------------------------------------------------------------------------------


def test_an_account_of_another_user_is_not_yours():
    assert check_resources(Resources(account="chem", **CPU), _site()) == [
        "slurm.account: 'chem' is not one of your accounts (user alice); yours: bio, physics"
    ]
    assert check_resources(Resources(account="bio", **CPU), _site()) == []


def test_unknown_names_keep_their_did_you_mean():
    assert check_resources(Resources(account="phsyics", qos="nromal", **CPU), _site()) == [
        "slurm.account: unknown account 'phsyics' (did you mean 'physics'?); known: bio, chem, physics",
        "slurm.qos: unknown QOS 'nromal' (did you mean 'normal'?); known: debug, gpu-long, high, normal",
    ]


def test_a_qos_the_account_may_not_use():
    assert check_resources(Resources(account="bio", qos="gpu-long", **CPU), _site()) == [
        "slurm.qos: your account 'bio' may not use QOS 'gpu-long' (user alice); its QOS: high, normal"
    ]
    assert check_resources(Resources(qos="gpu-long", **CPU), _site()) == []  # physics, the default account


def test_a_user_without_associations_is_refused_nothing():
    limits = _limits(SITE_USERS, SITE_QOS, user="dave")
    assert limits.associations is None
    assert check_resources(Resources(account="chem", **CPU), limits) == []


def test_the_qos_a_task_is_given():
    limits = _site()
    assert limits.qos_of(Resources(**CPU)).name == "normal"  # physics' default QOS
    assert limits.qos_of(Resources(account="bio", **CPU)).name == "normal"  # two QOS, no default
    assert limits.qos_of(Resources(qos="debug", **CPU)).name == "debug"
    one = Association(account="x", qos=frozenset({"gpu-long"}))
    assert one.given_qos == "gpu-long"


# --- QOS limits --------------------------------------------------------------------------------------------------


def test_a_time_limit_longer_than_the_qos_maxwall():
    asked = Resources(qos="capped", **{**CPU, "time": "00:20:01"})
    assert check_resources(asked, _limits()) == [
        'slurm.time: "00:20:01" is longer than QOS \'capped\' allows (MaxWall); set it to at most "00:20:00", '
        "or use time: auto"
    ]
    assert check_resources(Resources(qos="capped", **CPU), _limits()) == []


def test_time_auto_is_capped_by_the_smaller_of_maxtime_and_maxwall():
    limits = _limits()
    plain = [Resources(**CPU), Resources(partition="short", **CPU)]
    assert preflight.max_times(limits, plain) == {(None, None): None, ("short", None): 1800}
    capped = [Resources(qos="capped", **CPU), Resources(partition="short", qos="capped", **CPU)]
    assert preflight.max_times(limits, capped) == {(None, "capped"): 1200, ("short", "capped"): 1200}
    # each QOS caps its own runs, in the same partition
    site = _site()
    both = [Resources(partition="debug", qos=q, **CPU) for q in ("debug", "gpu-long")]
    assert preflight.max_times(site, both) == {("debug", "debug"): 1800, ("debug", "gpu-long"): 7 * 86400}
    assert preflight.max_times(site, [Resources(partition="debug", **CPU)])[("debug", None)] == 2 * 86400  # normal


def test_a_task_that_alone_holds_more_than_maxtrespu():
    big = Resources(qos="gpu-long", gpus_per_node=2, pack=2, cpus_per_task=32, mem_gb=300, time="01:00:00")
    assert [p for p in check_resources(big, _site()) if "QOS" in p] == [  # the local node has less, too
        "slurm.cpus_per_task: 32, but QOS 'gpu-long' lets each user hold at most cpu=16 at once (MaxTRESPU), so no "
        "task would ever start; ask for at most 16",
        "slurm.mem_gb: 300, but QOS 'gpu-long' lets each user hold at most mem=262144M at once (MaxTRESPU), so no "
        "task would ever start; ask for at most 256",
    ]
    typed = Resources(qos="debug", gpu_type="a100", gpus_per_node=2, pack=2, cpus_per_task=2, time="00:10:00")
    limits = _site()
    assert [p for p in check_resources(typed, limits) if "QOS" in p] == []  # exactly the limit
    capped = Resources(qos="capped", gpus_per_node=2, pack=2, cpus_per_task=2, time="00:10:00")
    assert check_resources(capped, _limits()) == [
        "slurm.gpus_per_node: 2, but QOS 'capped' lets each user hold at most gres/gpu=1 at once (MaxTRESPU), so no "
        "task would ever start; ask for at most 1"
    ]
    nodes = Qos(name="none", max_tres={"node": 0})
    assert check_resources(Resources(**CPU), dataclasses.replace(_limits(), qos_limits={"normal": nodes})) == [
        "slurm.qos: each task holds node=1, but QOS 'none' lets each user hold at most node=0 at once (MaxTRESPU); "
        "choose another QOS"
    ]


def test_more_array_tasks_than_maxsubmitpu_allows():
    limits = _limits(queued=QUEUED)  # 2 of capped's 3 already queued
    asked = Resources(qos="capped", **CPU)
    assert preflight.problems(_tasks(asked, 1), limits, data=False) == []
    assert preflight.problems(_tasks(asked, 4), limits, data=False) == [
        "slurm.qos: QOS 'capped' lets user root have 3 jobs queued or running (MaxSubmitJobsPU; each array task is one "
        "job); 2 are queued now, so 1 more, but this grid makes 4 array tasks; put more runs in each task (pack: 4 or "
        "more), or submit fewer runs; array_parallelism does not help (it limits running tasks, not queued ones)"
    ]
    full = _limits(queued=QUEUED + "capped\n")
    assert (
        "so 0 more, but this grid makes 1 array task; wait until some of them end;"
        in (preflight.problems(_tasks(asked, 1), full, data=False)[0])
    )
    packed = dataclasses.replace(asked, gpus_per_node=1, pack=4)  # 4 runs share a GPU
    assert preflight.problems(_tasks(packed, 4), limits, data=False) == []
    # tasks of the default QOS (normal: no MaxSubmitJobsPU) count against none
    assert preflight.problems(_tasks(Resources(**CPU), 9), limits, data=False) == []


def test_tasks_of_each_qos_count_against_their_own():
    site = _site(queued="debug\n" * 1 + "normal\n" * 95)
    debug = Resources(qos="debug", gpus_per_node=1, cpus_per_task=1, time="00:10:00")
    normal = Resources(qos="normal", gpus_per_node=1, cpus_per_task=1, time="00:10:00")
    tasks = _tasks(debug, 2) + _tasks(normal, 6)
    said = preflight.problems(tasks, site, data=False)
    assert [re.match(r"slurm.qos: QOS '(\S+)'.*makes (\d+) array tasks", p).groups() for p in said] == [
        ("debug", "2"),
        ("normal", "6"),
    ]


# --- throttling ----------------------------------------------------------------------------------------------


def test_array_parallelism_is_lowered_to_what_the_qos_lets_run():
    limits = _site()
    asked = {
        "a": Resources(qos="gpu-long", gpus_per_node=1, cpus_per_task=4, time="01:00:00"),
        "b": Resources(qos="gpu-long", gpus_per_node=1, cpus_per_task=4, time="01:00:00"),
        "c": Resources(qos="normal", gpus_per_node=2, pack=2, cpus_per_task=8, array_parallelism=4),
        "d": Resources(qos="high", **CPU),
    }
    out, notes = preflight.throttle(asked, limits)
    assert out["a"] is out["b"] and out["a"].array_parallelism == 2
    assert out["c"] is asked["c"] and out["d"] is asked["d"]  # 4 x 2 GPUs and 4 x 8 CPUs fit, high has no limit
    assert notes == [
        "note: QOS 'gpu-long' lets each user run 2 such tasks at once (MaxJobsPU 2): array_parallelism 16 -> 2 for "
        "its runs"
    ]
    tres = {"x": Resources(qos="normal", gpus_per_node=3, pack=3, cpus_per_task=16)}  # 8 // 3 GPUs, 64 // 16 CPUs
    assert preflight.throttle(tres, limits)[0]["x"].array_parallelism == 2
    out, notes = preflight.throttle({"x": Resources(qos="capped", gpus_per_node=1, cpus_per_task=1)}, _limits())
    assert out["x"].array_parallelism == 1
    assert notes == [
        "note: QOS 'capped' lets each user run 1 such task at once (MaxTRESPU gres/gpu=1, MaxJobsPU 1): "
        "array_parallelism 16 -> 1 for its runs"
    ]


def test_a_task_too_big_for_the_qos_is_not_throttled_but_refused():
    asked = {"x": Resources(qos="capped", gpus_per_node=2, pack=2, cpus_per_task=1, array_parallelism=1)}
    assert preflight.throttle(asked, _limits()) == (asked, [])


def test_without_accounting_nothing_is_throttled():
    limits = ClusterLimits(partitions=inventory.parse_partitions(PARTITIONS), nodes=tuple(inventory.parse_nodes(NODES)))
    asked = {"x": Resources(qos="capped", **CPU)}
    assert preflight.throttle(asked, limits) == (asked, [])
    assert preflight.problems(_tasks(asked["x"], 9), limits, data=False) == []


# --- the live cluster ----------------------------------------------------------------------------------------

GRID = """\
models: [resnet20]
datasets: [synthetic10]
opts: [step-160]
batch_sizes: [64]
seeds: {seeds}
epochs: {epochs}
root: {root}
results: {results}
slurm: {{qos: capped, gpus_per_node: {gpus}, cpus_per_task: 1, mem_gb: 1, time: "{time}", extra: {{hold: true}}}}
"""


def _live() -> ClusterLimits:
    """The local cluster's limits; skips where it is not up or has no QOS capped (an older cluster.sh)."""
    if (
        not shutil.which("sbatch")
        or "UP" not in subprocess.run(["scontrol", "ping"], capture_output=True, text=True).stdout
    ):
        pytest.skip("no local SLURM cluster (bash slurm/cluster.sh up)")
    limits = inventory.read_limits()
    if "capped" not in limits.qos_limits:
        pytest.skip("the local cluster has no QOS capped; add it with `bash slurm/cluster.sh up`")
    return limits


def _grid(tmp_path, root, *, seeds=(0, 1, 2, 3), epochs=1, gpus=0, time="00:15:00") -> str:
    path = tmp_path / f"grid-{len(list(tmp_path.glob('grid-*')))}.yaml"
    path.write_text(
        GRID.format(seeds=list(seeds), epochs=epochs, gpus=gpus, time=time, root=root, results=tmp_path / "results")
    )
    return str(path)


@pytest.mark.slurm
def test_the_live_cluster_refuses_more_tasks_than_the_qos_takes(tmp_path, synthetic_root, capsys):
    limits = _live()
    queued = limits.queued.get("capped", 0)
    assert main(["submit", _grid(tmp_path, synthetic_root), "--dry-run"]) == 2
    out, err = capsys.readouterr()
    assert "note: QOS 'capped' lets each user run 1 such task at once (MaxJobsPU 1): array_parallelism 16 -> 1" in out
    assert (
        "slurm.qos: QOS 'capped' lets user root have 3 jobs queued or running (MaxSubmitJobsPU; each array task is "
        f"one job){f'; {queued}' if queued else ''}"
    ) in err
    assert "but this grid makes 4 array tasks" in err and "nothing was submitted" in err


@pytest.mark.slurm
@pytest.mark.extended
def test_the_live_cluster_caps_time_and_throttles_arrays(tmp_path, synthetic_root, capsys):
    _live()
    assert main(["submit", _grid(tmp_path, synthetic_root, seeds=[0], time="00:30:00"), "--dry-run"]) == 2
    assert 'slurm.time: "00:30:00" is longer than QOS \'capped\' allows (MaxWall); set it to at most "00:20:00"' in (
        capsys.readouterr().err
    )
    # the prior estimate of 300 epochs is about 40 minutes: time: auto asks for MaxWall, not more
    assert main(["submit", _grid(tmp_path, synthetic_root, seeds=[0], epochs=300, time="auto"), "--dry-run"]) == 0
    assert "time 00:20:00 (auto)" in capsys.readouterr().out
    # one GPU a task: MaxTRESPU gres/gpu=1 and MaxJobsPU 1 both allow one task at a time, and SLURM is told so
    assert main(["submit", _grid(tmp_path, synthetic_root, seeds=[0, 1], gpus=1)]) == 0
    out = capsys.readouterr().out
    assert "(MaxTRESPU gres/gpu=1, MaxJobsPU 1): array_parallelism 16 -> 1" in out
    (array,) = re.findall(r"as job (\d+)", out)
    try:
        shown = subprocess.run(["scontrol", "show", "job", "-o", array], capture_output=True, text=True).stdout
        assert "ArrayTaskThrottle=1 " in shown and "QOS=capped " in shown
    finally:
        subprocess.run(["scancel", array], check=False)
