"""SLURM output parsing on recorded text (slurm-wlm 22.05.8, the local cluster), without a cluster.

Each constant is what the command in its comment printed; the real-cluster tests in test_slurm.py exercise the
same parsers against live daemons."""

import subprocess
from pathlib import Path

import pytest

from cifarbench.cluster import queue

# sacct -n -P -X -o JobID,State -j 1   (array 0-7%2: two running, the rest pending, task 6 cancelled while pending)
SACCT_THROTTLED = """\
1_0|RUNNING
1_1|RUNNING
1_[2-5,7%2]|PENDING
"""
# squeue -h -r -o %i|%T -j 1   (the same moment: -r lists every pending task on a line of its own)
SQUEUE_EXPANDED = """\
1_2|PENDING
1_3|PENDING
1_4|PENDING
1_5|PENDING
1_7|PENDING
1_1|RUNNING
1_0|RUNNING
"""
# squeue -h -r -o %i   (every job, for telling a task cancelled while pending from one just starting)
SQUEUE_IDS = "1_2\n1_3\n1_4\n1_5\n1_7\n1_0\n1_1\n"
# sacct -n -P -X -o JobID,State -j 1   (after `scancel 1`: states carry "by <uid>")
SACCT_CANCELLED = """\
1_0|CANCELLED by 0
1_1|CANCELLED by 0
1_[2-5,7%2]|CANCELLED by 0
"""
# sacct -n -P -X -o JobID,State -j 4,5   (a plain job that exited 3, a finished array)
SACCT_ENDED = "4|FAILED\n5_0|COMPLETED\n5_1|COMPLETED\n5_2|COMPLETED\n"
RECORDED = Path(__file__).parent / "recorded"


@pytest.mark.parametrize(
    "job, ids",
    [
        ("12_[3-5,7%2]", ["12_3", "12_4", "12_5", "12_7"]),
        ("12_[0-2]", ["12_0", "12_1", "12_2"]),
        ("12_[4]", ["12_4"]),
        ("12_[1,3,5%1]", ["12_1", "12_3", "12_5"]),
        ("12_3", ["12_3"]),
        ("12", ["12"]),
        ("12_[3-5", ["12_[3-5"]),  # not an array range: left as it is
    ],
)
def test_array_ranges_expand_to_their_tasks(job, ids):
    assert queue.expand_job_id(job) == ids


def test_a_throttled_pending_range_is_one_line_in_sacct_and_expands_to_each_task():
    states = queue.parse_states(SACCT_THROTTLED)
    assert states == {"1_0": "RUNNING", "1_1": "RUNNING", **{f"1_{i}": "PENDING" for i in (2, 3, 4, 5, 7)}}
    assert queue.parse_states(SQUEUE_EXPANDED) == states


def test_state_suffixes_are_dropped():
    states = queue.parse_states(SACCT_CANCELLED)
    assert set(states.values()) == {"CANCELLED"} and len(states) == 7


def test_ended_jobs_and_a_plain_job_id():
    assert queue.parse_states(SACCT_ENDED) == {
        "4": "FAILED",
        "5_0": "COMPLETED",
        "5_1": "COMPLETED",
        "5_2": "COMPLETED",
    }


@pytest.mark.parametrize("text", ["", "\n", "   \n\n"])
def test_empty_output_has_no_states(text):
    assert queue.parse_states(text) == {}


def test_a_line_without_a_state_reads_as_unknown():
    assert queue.parse_states("7_1|\n7_2\n") == {"7_1": "UNKNOWN", "7_2": "UNKNOWN"}


def test_a_task_cancelled_while_pending_is_found_by_its_absence():
    # task 6 was cancelled while pending: sacct's pending range skips it, squeue does not list it
    states = queue.parse_states(SACCT_THROTTLED)
    submitted = {f"1_{i}" for i in range(8)}
    assert queue.cancelled_before_start(submitted, states, set(SQUEUE_IDS.split())) == {"1_6": "CANCELLED"}


def test_a_task_missing_from_sacct_but_queued_is_not_cancelled():
    # a task that has just started can be missing from sacct for a moment; squeue shows it
    states = {"1_0": "RUNNING"}
    assert queue.cancelled_before_start({"1_0", "1_1"}, states, {"1_0", "1_1"}) == {}


def test_arrays_sacct_does_not_list_are_not_guessed_about():
    # accounting has no row for array 9 at all (just submitted, or accounting lags): nothing is concluded
    assert queue.cancelled_before_start({"9_0", "9_1"}, {"1_0": "RUNNING"}, set()) == {}


def test_max_array_size_from_recorded_scontrol_output():
    text = (RECORDED / "scontrol-show-config.txt").read_text()
    assert queue.parse_config_value(text, "MaxArraySize") == "1001"
    assert queue.parse_config_value(text, "AccountingStorageType") == "accounting_storage/slurmdbd"
    assert queue.parse_config_value(text, "NoSuchKey") is None
    assert queue.parse_config_value("", "MaxArraySize") is None


class Binaries:
    """Recorded answers of sacct and squeue, by command name; what was called is kept."""

    def __init__(self, **answers: tuple[int, str]):
        self.answers, self.calls = answers, []

    def __call__(self, args: list[str]) -> subprocess.CompletedProcess:
        self.calls.append(args)
        code, out = self.answers[args[0]] if args[0] != "squeue" or "-j" in args else self.answers["squeue_all"]
        return subprocess.CompletedProcess(args, code, stdout=out, stderr="")


def test_states_of_many_arrays_take_one_sacct_call():
    binaries = Binaries(sacct=(0, SACCT_THROTTLED + SACCT_ENDED), squeue_all=(0, SQUEUE_IDS))
    ids = {f"1_{i}" for i in range(8)} | {"5_0", "5_1", "5_2"}
    states = queue.slurm_states(ids, run=binaries)
    assert states["1_6"] == "CANCELLED" and states["1_7"] == "PENDING" and states["5_2"] == "COMPLETED"
    assert [c[0] for c in binaries.calls] == ["sacct", "squeue"]
    assert binaries.calls[0][-1] == "1,5"  # both arrays in one call


def test_with_accounting_off_squeue_answers_for_what_is_queued():
    # sacct -j 1 on a cluster without accounting storage: exit 1, nothing on stdout
    binaries = Binaries(sacct=(1, ""), squeue=(0, SQUEUE_EXPANDED))
    states = queue.slurm_states({f"1_{i}" for i in range(8)}, run=binaries)
    assert states == queue.parse_states(SQUEUE_EXPANDED) and "1_6" not in states
    assert [c[0] for c in binaries.calls] == ["sacct", "squeue"]


def test_no_jobs_ask_nothing():
    binaries = Binaries()
    assert queue.slurm_states(set(), run=binaries) == {} and binaries.calls == []
