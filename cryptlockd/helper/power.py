"""sync and syncfs with deadlines, sync_on_suspend, and the write to /sys/power/state."""

from __future__ import annotations

import contextlib
import ctypes
import functools
import json
import os
import select
import signal
import time

from cryptlockd.helper.cycle import DeadlinePassed, SleepFailed

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

SYNC_ON_SUSPEND = "/sys/power/sync_on_suspend"
RCU_EXPEDITED = "/sys/kernel/rcu_expedited"
POWER_STATE = "/sys/power/state"
MEM_SLEEP = "/sys/power/mem_sleep"
# The real root's mount table and tree: the helper itself is chrooted into the ramfs.
HOST_MOUNTINFO = "/proc/1/mountinfo"
HOST_ROOT = "/proc/1/root"
# Only block-backed filesystems: a FUSE or network filesystem could block syncfs() for good
# once its server is frozen.
_SYNCFS_SKIP_PREFIXES = ("fuse", "nfs", "cifs", "smb", "9p", "ceph", "autofs")

_libc = ctypes.CDLL(None, use_errno=True)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as octal.
    out, i = [], 0
    while i < len(field):
        code = field[i + 1 : i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def block_mounts(mountinfo: str) -> list[str]:
    """Mount points of block-device filesystems, from mountinfo text. Pure."""
    points: list[str] = []
    for line in mountinfo.splitlines():
        left, sep, right = line.partition(" - ")
        if not sep:
            continue
        fields, rfields = left.split(), right.split()
        if len(fields) < 5 or len(rfields) < 2:
            continue
        fstype, source = rfields[0], rfields[1]
        if fstype.startswith(_SYNCFS_SKIP_PREFIXES) or not source.startswith("/dev/"):
            continue
        point = _unescape(fields[4])
        if point not in points:
            points.append(point)
    return points


# A forked child (the jobs', the watchdog) closes every descriptor below this but its own.
MAX_FD = 65536


def close_all_but(*keep: int) -> None:
    """In a forked child: closes every descriptor above 2 but `keep`."""
    low = 3
    for fd in sorted(keep):
        os.closerange(low, fd)
        low = fd + 1
    os.closerange(low, MAX_FD)


def _run_and_report(job: Callable[[], str], w: int) -> None:
    """In the jobs' child: runs one job and writes its error ("" for none) as one line."""
    try:
        error = job()
    except Exception as e:
        error = str(e) or type(e).__name__
    os.write(w, error.replace("\n", " ").encode() + b"\n")


def run_with_deadline(jobs: list[tuple[str, Callable[[], str]]], timeout: float) -> list[str]:
    """Runs the jobs one after the other in a child process; returns their errors (each job
    returns one, or ""). Raises DeadlinePassed, naming the job, when one takes longer than
    `timeout` seconds.

    Why a child, and one left behind: sync() and syncfs() wait in uninterruptible sleep (D
    state) on a server that does not answer (a FUSE server that is frozen, an NFS server that
    is gone), and nothing can end them. In a thread, such a call would keep the whole helper
    alive: its fd table (the daemon's and the sleep entry's sockets, the watchdog's pipe)
    stays open and PID 1 never hears it exit, so the unit, with TimeoutStopSec=infinity and
    SendSIGKILL=no, stays up for good, its ExecStopPost= (the recovery) never runs, and no
    later helper can start. A child that has closed every inherited descriptor holds none of
    that: the helper abandons it (SIGKILLed, it dies the moment its call returns), finishes
    and reports its cycle, and exits; the child stays in the helper unit's cgroup, which is
    never frozen, and KillMode=process lets the unit stop and start again without it. PID 1
    reaps it whenever it ends. The KDF reserve is not inherited (MADV_DONTFORK), so all it
    holds meanwhile is its copy of the helper's heap."""
    if not jobs:
        return []
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            close_all_but(w)
            for _, job in jobs:
                _run_and_report(job, w)
        finally:
            os._exit(0)
    os.close(w)
    try:
        errors = _collect(pid, r, [name for name, _ in jobs], timeout)
    finally:
        os.close(r)
    os.waitpid(pid, 0)
    return errors


def _collect(pid: int, r: int, names: list[str], timeout: float) -> list[str]:
    """One answer per job from child `pid` on `r`, each within `timeout` seconds; SIGKILLs
    the child and raises DeadlinePassed past it."""
    errors: list[str] = []
    buf = b""
    for name in names:
        deadline = time.monotonic() + timeout
        while b"\n" not in buf:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([r], [], [], left)[0]:
                os.kill(pid, signal.SIGKILL)
                raise DeadlinePassed(f"{name} did not finish within {timeout:g} s")
            data = os.read(r, 4096)
            if not data:
                os.waitpid(pid, 0)
                raise RuntimeError(f"the process running {name} ended before it did")
            buf += data
        line, buf = buf.split(b"\n", 1)
        if line:
            errors.append(line.decode(errors="replace"))
    return errors


def _sync(_: str = "") -> str:
    os.sync()
    return ""


def _syncfs(point: str) -> str:
    # Opened in the child too: the path lookup alone can wait on a dead server (a block
    # device's file system mounted below a network one).
    try:
        fd = os.open(HOST_ROOT + point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as e:
        return f"{point}: {e}"
    try:
        if _libc.syncfs(fd) != 0:
            return f"{point}: syncfs: {os.strerror(ctypes.get_errno())}"
    finally:
        os.close(fd)
    return ""


# What a SyncWorker can be asked to run: the kind of job, given its argument.
JOBS: dict[str, Callable[[str], str]] = {"sync": _sync, "syncfs": _syncfs}
# (name in errors, kind, argument)
Job = tuple[str, str, str]


class SyncWorker:
    """A child forked at arm, after `armed` (server.py), that runs the cycle's sync() and
    syncfs() jobs, so that the way to the sleep forks nothing: each fork there cost about
    10 ms under TCG, page tables and the copies on write after it (issue 12). The rules of
    run_with_deadline hold: it has closed every other descriptor, a job past its deadline
    gets it SIGKILLed and left behind, and a child that dies mid-job is an error. Jobs with
    no worker (never started, stopped, or gone before they were sent) get a child of their
    own, as before."""

    def __init__(self, jobs: Mapping[str, Callable[[str], str]] = JOBS) -> None:
        self.jobs = jobs
        self.pid = 0
        self._requests = -1
        self._answers = -1

    def start(self) -> None:
        self.stop()
        req_r, req_w = os.pipe()
        ans_r, ans_w = os.pipe()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                close_all_but(req_r, ans_w)
                self._serve(req_r, ans_w)
            finally:
                os._exit(0)
        os.close(req_r)
        os.close(ans_w)
        self.pid, self._requests, self._answers = pid, req_w, ans_r

    def _serve(self, r: int, w: int) -> None:  # pragma: no cover - the child
        buf = b""
        while data := os.read(r, 4096):
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                kind, arg = json.loads(line)
                _run_and_report(functools.partial(self.jobs[kind], arg), w)

    def run(self, jobs: list[Job], timeout: float) -> list[str]:
        if not jobs:
            return []
        if self.pid:
            request = b"".join(json.dumps([kind, arg]).encode() + b"\n" for _, kind, arg in jobs)
            try:
                os.write(self._requests, request)
            except OSError:
                self._abandon()  # gone before the jobs: they get a child of their own
            else:
                try:
                    return _collect(self.pid, self._answers, [name for name, _, _ in jobs], timeout)
                except BaseException:
                    self._abandon()
                    raise
        return run_with_deadline(
            [(name, functools.partial(self.jobs[kind], arg)) for name, kind, arg in jobs], timeout
        )

    def _abandon(self) -> None:
        os.close(self._requests)
        os.close(self._answers)
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, os.WNOHANG)  # reaped now if it is dead already
        self.pid = 0

    def stop(self) -> None:
        """No more jobs this cycle: the worker ends at the end of its pipe."""
        if self.pid:
            self._abandon()


def sync(timeout: float, worker: SyncWorker | None = None) -> None:
    """sync(), before anything is frozen (a FUSE server can still answer), within `timeout`
    seconds (an NFS server that has gone away never will)."""
    (worker or SyncWorker()).run([("sync()", "sync", "")], timeout)


def syncfs_block_mounts(timeout: float, worker: SyncWorker | None = None) -> list[str]:
    """syncfs() on every block-backed file system of the real root, each within `timeout`
    seconds (a loop device on a file of a frozen FUSE server is block-backed too). Returns
    the errors."""
    try:
        with open(HOST_MOUNTINFO) as f:
            points = block_mounts(f.read())
    except OSError as e:
        return [f"{HOST_MOUNTINFO}: {e}"]
    return (worker or SyncWorker()).run(
        [(f"syncfs({point})", "syncfs", point) for point in points], timeout
    )


def _write(path: str, value: str) -> None:
    # Unbuffered: the kernel's answer (EBUSY, EINVAL...) must reach us from this write().
    fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    try:
        n = os.write(fd, value.encode())
        if n != len(value):
            raise OSError(f"short write to {path}: {n} of {len(value)} bytes")
    finally:
        os.close(fd)


def get_sync_on_suspend() -> str | None:
    try:
        with open(SYNC_ON_SUSPEND) as f:
            return f.read().strip()
    except FileNotFoundError:
        return None  # kernels before 5.6 always sync; freezing first is what saves us there


def set_sync_on_suspend(value: str) -> None:
    _write(SYNC_ON_SUSPEND, value)


def get_rcu_expedited() -> str | None:
    try:
        with open(RCU_EXPEDITED) as f:
            return f.read().strip()
    except OSError:
        return None  # Tiny RCU has no such file


def set_rcu_expedited(value: str) -> None:
    _write(RCU_EXPEDITED, value)


def read_power_files() -> tuple[str, str]:
    with open(POWER_STATE) as f:
        state = f.read()
    try:
        with open(MEM_SLEEP) as f:
            mem = f.read()
    except FileNotFoundError:
        mem = ""
    return state, mem


def enter_sleep(state: str, mem_sleep: str | None) -> None:
    """Returns after wake. Raises SleepFailed when the kernel refused to sleep."""
    try:
        if mem_sleep:
            _write(MEM_SLEEP, mem_sleep)
        _write(POWER_STATE, state)
    except OSError as e:
        raise SleepFailed(f"writing {state!r} to {POWER_STATE}: {e}") from e


def power_off() -> None:
    # LINUX_REBOOT_MAGIC1/2 are checked by the syscall wrapper; RB_POWER_OFF.
    _libc.reboot(0x4321FEDC)
