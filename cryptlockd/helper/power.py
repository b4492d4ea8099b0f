"""sync, sync_on_suspend and the write to /sys/power/state."""

from __future__ import annotations

import ctypes
import os

from cryptlockd.helper.cycle import SleepFailed

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


def sync_all() -> list[str]:
    """sync(), then syncfs() on every block filesystem of the real root. Returns errors."""
    os.sync()
    errors: list[str] = []
    try:
        with open(HOST_MOUNTINFO) as f:
            points = block_mounts(f.read())
    except OSError as e:
        return [f"{HOST_MOUNTINFO}: {e}"]
    for point in points:
        try:
            fd = os.open(HOST_ROOT + point, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError as e:
            errors.append(f"{point}: {e}")
            continue
        try:
            if _libc.syncfs(fd) != 0:
                errors.append(f"{point}: syncfs: {os.strerror(ctypes.get_errno())}")
        finally:
            os.close(fd)
    return errors


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
