"""sync and syncfs with deadlines, sync_on_suspend, and the write to /sys/power/state."""

from __future__ import annotations

import ctypes
import functools
import os
import select
import signal
import time

from cryptlockd.helper.cycle import DeadlinePassed, SleepFailed

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from collections.abc import Callable

SYNC_ON_SUSPEND = "/sys/power/sync_on_suspend"
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


# The jobs' child closes every file descriptor above these (see run_with_deadline).
MAX_FD = 65536


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
            os.closerange(3, w)
            os.closerange(w + 1, MAX_FD)
            for _, job in jobs:
                try:
                    error = job()
                except Exception as e:
                    error = str(e) or type(e).__name__
                os.write(w, error.replace("\n", " ").encode() + b"\n")
        finally:
            os._exit(0)
    os.close(w)
    errors: list[str] = []
    buf = b""
    try:
        for name, _ in jobs:
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
    finally:
        os.close(r)
    os.waitpid(pid, 0)
    return errors


def _sync() -> str:
    os.sync()
    return ""


def sync(timeout: float) -> None:
    """sync(), before anything is frozen (a FUSE server can still answer), within `timeout`
    seconds (an NFS server that has gone away never will)."""
    run_with_deadline([("sync()", _sync)], timeout)


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


def syncfs_block_mounts(timeout: float) -> list[str]:
    """syncfs() on every block-backed file system of the real root, each within `timeout`
    seconds (a loop device on a file of a frozen FUSE server is block-backed too). Returns
    the errors."""
    try:
        with open(HOST_MOUNTINFO) as f:
            points = block_mounts(f.read())
    except OSError as e:
        return [f"{HOST_MOUNTINFO}: {e}"]
    return run_with_deadline(
        [(f"syncfs({point})", functools.partial(_syncfs, point)) for point in points], timeout
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
