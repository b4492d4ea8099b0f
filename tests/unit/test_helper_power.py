from __future__ import annotations

import ctypes
import os
import select
import signal
import time

import pytest

from cryptlockd.helper import power
from cryptlockd.helper.cycle import DeadlinePassed
from cryptlockd.helper.hardening import Reserve


def test_block_mounts() -> None:
    info = (
        "22 1 253:0 / / rw,relatime - ext4 /dev/mapper/root rw\n"
        "23 22 0:5 / /proc rw - proc proc rw\n"
        "24 22 253:1 / /da\\040ta rw - ext4 /dev/mapper/data rw\n"
        "25 22 0:40 / /mnt/f rw - fuse.sshfs /dev/fake rw\n"
    )
    assert power.block_mounts(info) == ["/", "/da ta"]


# -- run_with_deadline: sync and syncfs in a child the helper can leave behind -------------


def _block_forever() -> str:
    select.select([], [], [])  # the child waits until it is killed
    return ""


def _open_fds() -> str:
    # The child's own descriptors, minus the one listdir opens: it must hold none of the
    # helper's (sockets, the watchdog's pipe), or a stuck child would keep them open.
    return " ".join(sorted(os.listdir("/proc/self/fd"), key=int))


def _die() -> str:
    os._exit(3)


def test_jobs_run_in_order_and_their_errors_come_back() -> None:
    assert power.run_with_deadline([("a", lambda: ""), ("b", lambda: "b: EIO")], 10) == ["b: EIO"]


def test_no_jobs_no_child() -> None:
    assert power.run_with_deadline([], 0) == []


def test_an_exception_in_a_job_is_its_error() -> None:
    def boom() -> str:
        raise OSError("ENOENT")

    assert power.run_with_deadline([("x", boom), ("y", lambda: "")], 10) == ["ENOENT"]


def test_the_child_holds_none_of_the_callers_descriptors() -> None:
    r, w = os.pipe()
    try:
        (fds,) = power.run_with_deadline([("fds", _open_fds)], 10)
    finally:
        os.close(r)
        os.close(w)
    held = set(fds.split()) - {"0", "1", "2"}
    # Its report pipe, and the directory listdir had open.
    assert len(held) == 2 and str(r) not in held and str(w) not in held, fds


def test_a_job_past_its_deadline_raises_and_is_left_behind_killed() -> None:
    before = time.monotonic()
    with pytest.raises(DeadlinePassed, match=r"^syncfs\(/mnt/nfs\) did not finish within 0.3 s$"):
        power.run_with_deadline([("sync()", lambda: ""), ("syncfs(/mnt/nfs)", _block_forever)], 0.3)
    assert time.monotonic() - before < 5
    # Not waited for (a child in D state never ends), but SIGKILLed: it dies once it can.
    # Reaped here, so the test leaves no zombie.
    _, status = os.wait()
    assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def test_each_job_has_its_own_deadline() -> None:
    def slow() -> str:
        time.sleep(0.2)
        return ""

    assert power.run_with_deadline([("1", slow), ("2", slow), ("3", slow)], 0.5) == []


def test_a_child_that_dies_is_an_error_not_a_hang() -> None:
    with pytest.raises(RuntimeError, match="ended before it did"):
        power.run_with_deadline([("sync()", _die)], 10)


def test_the_kdf_reserve_is_not_in_the_child() -> None:
    reserve = Reserve(256)
    assert reserve.area is not None
    start = ctypes.addressof(ctypes.c_char.from_buffer(reserve.area))

    def mapped() -> str:
        with open("/proc/self/maps") as f:
            for line in f:
                lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
                if lo <= start < hi:
                    return "mapped"
        return ""

    try:
        assert mapped() == "mapped"  # in this process
        assert power.run_with_deadline([("maps", mapped)], 10) == []
    finally:
        reserve.release()


def test_the_kdf_reserve_is_resident_once_taken() -> None:
    # Faulted in when taken, while the system is healthy: not at the KDF after the wake.
    def rss_kib() -> int:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    before = rss_kib()
    reserve = Reserve(32 * 1024)
    try:
        assert rss_kib() - before >= 31 * 1024
    finally:
        reserve.release()
