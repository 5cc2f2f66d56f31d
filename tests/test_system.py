"""What a process uses of its machine, as a record holds it: the peak resident memory of a training attempt.

Each measurement runs in a fresh process, whose lifetime peak (the fallback where no reset is possible) is about
what it holds."""

import ctypes
import json
import subprocess
import sys

import pytest

MEASURE = """
import json
from cifarbench.system import peak_rss_mb, reset_peak_rss
start = peak_rss_mb()
{allocate}
raised = peak_rss_mb()
del blocks
reset = reset_peak_rss()
print(json.dumps({{"start": start, "raised": raised, "reset": reset, "after": peak_rss_mb()}}))
"""


def _measure(allocate: str) -> dict:
    code = MEASURE.format(allocate=allocate)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True)
    return json.loads(out.stdout)


def test_the_peak_rises_with_touched_memory_and_falls_back_once_reset():
    peak = _measure('blocks = bytearray(b"\\x01") * (200 * 2**20)')  # every page written: resident
    assert peak["raised"] >= peak["start"] + 150, peak
    if not peak["reset"]:
        pytest.skip("/proc/self/clear_refs is not writable here: the peak stays the process's lifetime peak")
    assert peak["after"] <= peak["raised"] - 150, peak


def test_memory_an_earlier_task_freed_is_not_in_the_next_ones_peak():
    # 200 MB in blocks glibc keeps on its heap once freed, each pinned in place by a small block that stays, as a
    # finished run leaves the heap of a process that trains the next one (local execution)
    peak = _measure(
        "stays = []\n"
        "blocks = []\n"
        "for _ in range(2000):\n"
        '    blocks.append(bytearray(b"\\x01") * 100_000)\n'
        '    stays.append(bytearray(b"\\x01") * 600)'
    )
    assert peak["raised"] >= peak["start"] + 150, peak
    if not peak["reset"]:
        pytest.skip("/proc/self/clear_refs is not writable here: the peak stays the process's lifetime peak")
    if not hasattr(ctypes.CDLL(None), "malloc_trim"):
        pytest.skip("not glibc: no malloc_trim to hand freed memory back")
    assert peak["after"] <= peak["raised"] - 150, peak
