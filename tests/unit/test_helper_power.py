from __future__ import annotations

import contextlib
import os
import select
import signal
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from cryptlockd.helper import mappings, power, protocol
from cryptlockd.helper import reserve as reserve_mod
from cryptlockd.helper.cycle import DeadlinePassed
from cryptlockd.helper.record import CycleRecord
from cryptlockd.helper.reserve import Reserve
from cryptlockd.helper.secret import SecretBuffer
from cryptlockd.helper.system_ops import SystemOps
from tests.wait import wait_until


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
    assert reserve.ready(10) == ""
    start = reserve.address

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


def _rss_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def test_the_kdf_reserve_is_resident_once_ready() -> None:
    # Faulted in before the suspends, while the system is healthy: not at the KDF after
    # the wake. Mapped at arm, filled by a thread (reserve.py).
    before = _rss_kib()
    reserve = Reserve(32 * 1024)
    try:
        reserve.start_filling()
        assert reserve.ready(10) == "" and reserve.filled_at is not None
        assert _rss_kib() - before >= 31 * 1024
    finally:
        reserve.release()
    assert reserve.address == 0 and _rss_kib() - before < 8 * 1024


def test_a_kdf_reserve_without_a_thread_is_filled_by_ready() -> None:
    before = _rss_kib()
    reserve = Reserve(8 * 1024)
    try:
        assert _rss_kib() - before < 4 * 1024  # mapped, not faulted in
        assert reserve.ready(10) == "" and _rss_kib() - before >= 7 * 1024
    finally:
        reserve.release()


def test_a_kdf_reserve_released_while_filling_stops_its_thread() -> None:
    reserve = Reserve(64 * 1024)
    reserve.start_filling()
    reserve.release()
    assert reserve.address == 0
    assert not [t for t in threading.enumerate() if t.name == "kdf-reserve"]


# -- SyncWorker: the same jobs, in a child forked ahead of the sleep ------------------------


def _worker_jobs() -> dict[str, Callable[[str], str]]:
    def fail(arg: str) -> str:
        return f"{arg}: EIO" if arg else ""

    def boom(arg: str) -> str:
        raise OSError(arg)

    return {
        "fail": fail,
        "boom": boom,
        "pid": lambda _: str(os.getpid()),
        "fds": lambda _: _open_fds(),
        "block": lambda _: _block_forever(),
        "die": lambda _: _die(),
    }


@pytest.fixture
def worker() -> Iterator[power.SyncWorker]:
    w = power.SyncWorker(_worker_jobs())
    w.start()
    yield w
    pid = w.pid
    w.stop()
    _reaped(pid)


def _reaped(pid: int) -> None:
    # The worker ends at the end of its pipe; stop() reaps it only if it is gone already.
    if pid:
        with contextlib.suppress(ChildProcessError):
            os.waitpid(pid, 0)


def test_the_worker_runs_jobs_in_order_in_one_child_forked_once(
    worker: power.SyncWorker,
) -> None:
    assert worker.run([("a", "fail", ""), ("b", "fail", "b"), ("c", "boom", "ENOENT")], 10) == [
        "b: EIO",
        "ENOENT",
    ]
    (first,) = worker.run([("p", "pid", "")], 10)
    (second,) = worker.run([("p", "pid", "")], 10)
    assert first == second == str(worker.pid) and int(first) != os.getpid()


def test_the_worker_holds_none_of_the_callers_descriptors() -> None:
    r, w = os.pipe()
    worker = power.SyncWorker(_worker_jobs())
    try:
        worker.start()
        (fds,) = worker.run([("fds", "fds", "")], 10)
    finally:
        os.close(r)
        os.close(w)
        pid = worker.pid
        worker.stop()
        _reaped(pid)
    held = set(fds.split()) - {"0", "1", "2"}
    # Its two pipes, and the directory listdir had open.
    assert len(held) == 3 and str(r) not in held and str(w) not in held, fds


def test_a_worker_past_its_deadline_is_killed_and_the_next_jobs_get_a_child(
    worker: power.SyncWorker,
) -> None:
    pid = worker.pid
    with pytest.raises(DeadlinePassed, match=r"^syncfs\(/mnt/nfs\) did not finish within 0.3 s$"):
        worker.run([("sync()", "fail", ""), ("syncfs(/mnt/nfs)", "block", "")], 0.3)
    # SIGKILLed, and reaped at once if it is dead already (else by the next wait).
    with contextlib.suppress(ChildProcessError):
        os.waitpid(pid, 0)
    wait_until(lambda: not os.path.exists(f"/proc/{pid}"), 10, message="the killed worker is gone")
    assert worker.pid == 0
    (other,) = worker.run([("p", "pid", "")], 10)
    assert int(other) not in (pid, os.getpid())


def test_a_worker_that_died_before_the_jobs_is_replaced_by_a_child(
    worker: power.SyncWorker,
) -> None:
    pid = worker.pid
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    (other,) = worker.run([("p", "pid", "")], 10)
    assert int(other) not in (pid, os.getpid()) and worker.pid == 0


def test_a_worker_that_dies_mid_job_is_an_error_not_a_hang(worker: power.SyncWorker) -> None:
    with pytest.raises(RuntimeError, match="ended before it did"):
        worker.run([("sync()", "die", "")], 10)
    assert worker.pid == 0


def test_without_a_worker_each_run_forks_its_own_child() -> None:
    worker = power.SyncWorker(_worker_jobs())
    (a,) = worker.run([("p", "pid", "")], 10)
    (b,) = worker.run([("p", "pid", "")], 10)
    assert a != b and os.getpid() not in (int(a), int(b))


# -- rcu_expedited: on for the suspends (cycle._suspend_all), noted for the recovery --------


@pytest.fixture
def rcu_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[Path, Path]:
    knob, state = tmp_path / "rcu_expedited", tmp_path / "state_rcu_expedited"
    monkeypatch.setattr(power, "RCU_EXPEDITED", str(knob))
    monkeypatch.setattr(protocol, "RCU_STATE_IN_RAMFS", str(state))
    return knob, state


def test_rcu_expedited_is_noted_before_it_is_set_and_forgotten_once_put_back(
    rcu_files: tuple[Path, Path],
) -> None:
    knob, state = rcu_files
    knob.write_text("0\n")
    ops = SystemOps.__new__(SystemOps)  # expedite_rcu and restore_rcu need no helper
    assert ops.expedite_rcu() == "0"
    assert power.get_rcu_expedited() == "1" and state.read_text() == "0\n"
    ops.restore_rcu("0")
    assert power.get_rcu_expedited() == "0" and not state.exists()


@pytest.mark.parametrize("now", ["1", None])
def test_rcu_expedited_on_already_or_absent_is_left_alone(
    rcu_files: tuple[Path, Path], now: str | None
) -> None:
    knob, state = rcu_files
    if now is not None:
        knob.write_text(now + "\n")
    assert SystemOps.__new__(SystemOps).expedite_rcu() is None
    assert not state.exists() and power.get_rcu_expedited() == now


def test_the_kdf_reserve_fills_at_nice_19_until_hurried(monkeypatch: pytest.MonkeyPatch) -> None:
    # While logind starts the sleep entry, the thread yields to it; from `begin` on it
    # runs at the helper's priority (session.Helper.begin).
    go = threading.Event()
    monkeypatch.setattr(reserve_mod.Reserve, "_fill", lambda self: go.wait(30))
    r = reserve_mod.Reserve(64)
    r.start_filling()
    assert r._thread is not None and r._thread.native_id is not None
    tid = r._thread.native_id
    wait_until(lambda: os.getpriority(os.PRIO_PROCESS, tid) == reserve_mod.FILL_NICE, 10)
    r.hurry()
    assert os.getpriority(os.PRIO_PROCESS, tid) == os.getpriority(os.PRIO_PROCESS, 0)
    go.set()
    r.release()


def test_a_kdf_reserve_not_in_by_the_deadline_is_said_and_does_not_hold_the_cycle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A thread stuck in reclaim, everything else frozen: the cycle waits RESERVE_WAIT at
    # most (SPEC 2.8), and release() leaves the memory mapped rather than wait for it.
    go = threading.Event()
    monkeypatch.setattr(reserve_mod.Reserve, "_fill", lambda self: go.wait(30))
    r = reserve_mod.Reserve(4 * 1024)
    r.start_filling()
    start = time.monotonic()
    assert r.ready(0.2) == "not all in after 0.2 s (0 of 4 MiB faulted in)"
    r.release(0.2)
    assert time.monotonic() - start < 5 and r.address != 0
    go.set()
    r.release()
    assert r.address == 0


def test_a_device_its_child_resumed_before_dying_counts_as_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # kdf.attempt_all tries a device again here when its child gave no answer; the child
    # may have resumed it first. A second resume would fail for good (not suspended).
    ops = SystemOps.__new__(SystemOps)
    record = CycleRecord(["root", "data"])
    ops.h = SimpleNamespace(record=record, devices={})  # type: ignore[assignment]
    monkeypatch.setattr(mappings, "luks_mappings", lambda: {"root": "u1", "data": "u2"})
    monkeypatch.setattr(mappings, "suspended_mappings", lambda: {"root"})
    with SecretBuffer() as secret:
        with pytest.raises(KeyError):  # no child for it: the real attempt (no device here)
            ops.resume_passphrase("data", secret)
        record.kdf_children.append("data")
        assert ops.resume_passphrase("data", secret)
        record.kdf_children.append("root")  # still suspended: the real attempt again
        with pytest.raises(KeyError):
            ops.resume_passphrase("root", secret)
