"""The helper's memory locking, on this machine's kernel, in a child process (mlockall
would lock the test process for good)."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys

import pytest

# Each child starts hardened, with status() to note VmLck and RssAnon in `out` (printed).
PRELUDE = """
import json, mmap, threading
from cryptlockd.helper.hardening import harden, lock_on_fault, mapped_unpopulated
from cryptlockd.helper.reserve import Reserve

def status():
    with open("/proc/self/status") as f:
        return {k: int(v.split()[0]) for k, _, v in (line.partition(":") for line in f)
                if k in ("VmLck", "RssAnon")}

out = {}
harden()
out["hardened"] = status()
"""
# After hardened: an 8 MiB mapping under MCL_FUTURE, the switch, a second 8 MiB mapping
# under MCL_ONFAULT, its first half touched; hardened again, a third 8 MiB mapping.
CHILD = """
first = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
out["mapped_future"] = status()
lock_on_fault()
out["switched"] = status()
second = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
out["mapped_onfault"] = status()
for i in range(0, 4 << 20, 4096):
    second[i] = 1
out["touched_half"] = status()
harden()
out["hardened_again"] = status()
third = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
out["mapped_after"] = status()
print(json.dumps(out))
"""


Kib = dict[str, dict[str, int]]


def _run_child(body: str) -> tuple[Kib, dict[str, int], dict[str, int]]:
    """The child's stages, and its RssAnon and VmLck (KiB) by stage."""
    result = subprocess.run(
        [sys.executable, "-c", PRELUDE + body], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    kib: Kib = json.loads(result.stdout)
    rss = {stage: v["RssAnon"] for stage, v in kib.items() if v}
    lck = {stage: v["VmLck"] for stage, v in kib.items() if v}
    return kib, rss, lck


def _can_lock() -> bool:
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    return os.geteuid() == 0 or soft == resource.RLIM_INFINITY


@pytest.mark.skipif(
    not _can_lock(), reason="mlockall of a Python process needs root or an unlimited RLIMIT_MEMLOCK"
)
def test_after_lock_on_fault_new_memory_is_locked_as_touched_and_old_stays_locked() -> None:
    kib, rss, lck = _run_child(CHILD)
    mib8 = 8 * 1024
    # MCL_FUTURE: the whole mapping is faulted in and locked inside mmap().
    assert rss["mapped_future"] - rss["hardened"] >= mib8 - 64, kib
    assert lck["mapped_future"] - lck["hardened"] >= mib8, kib
    # The switch unlocks nothing and faults nothing out.
    assert lck["switched"] >= lck["mapped_future"], kib
    assert rss["switched"] >= rss["mapped_future"] - 256, kib
    # MCL_ONFAULT: the mapping is locked, but nothing is faulted in by mmap() itself...
    assert lck["mapped_onfault"] - lck["switched"] >= mib8, kib
    assert rss["mapped_onfault"] - rss["switched"] < 1024, kib
    # ...each page is, as it is touched.
    grown = rss["touched_half"] - rss["mapped_onfault"]
    assert mib8 // 2 - 64 <= grown < mib8 - 1024, kib
    # After the switch, harden() locks again: the untouched half is faulted in, and new
    # memory is faulted in whole again.
    assert rss["hardened_again"] - rss["touched_half"] >= mib8 // 2 - 64, kib
    assert rss["mapped_after"] - rss["hardened_again"] >= mib8 - 64, kib


# Under harden(): the KDF reserve is mapped locked but not faulted in, a thread started in
# mapped_unpopulated() gets no 8 MiB of stack faulted in, memory mapped after it is again,
# and the reserve's own thread faults it in (reserve.py).
RESERVE_CHILD = """
reserve = Reserve(32 << 10)
out["mapped"] = status()
go = threading.Event()
with mapped_unpopulated():
    t = threading.Thread(target=go.wait)
    t.start()
out["thread"] = status()
go.set()
t.join()
after = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
out["mapped_after"] = status()
reserve.start_filling()
if reserve.ready(10) == "":
    out["error"] = {}
out["ready"] = status()
print(json.dumps(out))
"""


@pytest.mark.skipif(
    not _can_lock(), reason="mlockall of a Python process needs root or an unlimited RLIMIT_MEMLOCK"
)
def test_the_kdf_reserve_is_locked_when_mapped_and_faulted_in_by_its_thread() -> None:
    kib, rss, lck = _run_child(RESERVE_CHILD)
    mib8, mib32 = 8 * 1024, 32 * 1024
    assert "error" in kib, kib  # ready() said it was all in
    # Mapped: locked, nothing faulted in.
    assert lck["mapped"] - lck["hardened"] >= mib32, kib
    assert rss["mapped"] - rss["hardened"] < 1024, kib
    # A thread started in mapped_unpopulated(): its stack is not faulted in whole.
    assert rss["thread"] - rss["mapped"] < 2048, kib
    # After it, MCL_FUTURE again: a new mapping is faulted in and locked inside mmap().
    assert rss["mapped_after"] - rss["thread"] >= mib8 - 64, kib
    # The thread faulted the reserve in.
    assert rss["ready"] - rss["mapped_after"] >= mib32 - 64, kib


def test_harden_locks_once_until_lock_on_fault(monkeypatch: pytest.MonkeyPatch) -> None:
    # The idle helper hardens itself, and the arm's harden() must then cost nothing.
    from cryptlockd.helper import hardening

    calls: list[tuple[str, int]] = []

    class Libc:
        def mlockall(self, flags: int) -> int:
            calls.append(("mlockall", flags))
            return 0

        def prctl(self, option: int, *args: int) -> int:
            calls.append(("prctl", option))
            return 0

    monkeypatch.setattr(hardening, "_libc", Libc())
    monkeypatch.setattr(hardening, "_populating", False)
    hardening.harden()
    hardening.harden()
    both = hardening.MCL_CURRENT | hardening.MCL_FUTURE
    assert calls == [("mlockall", both), ("prctl", hardening.PR_SET_DUMPABLE)]
    hardening.lock_on_fault()
    calls.clear()
    hardening.harden()
    assert calls == [("mlockall", both), ("prctl", hardening.PR_SET_DUMPABLE)]
