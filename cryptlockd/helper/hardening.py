"""The helper's process hardening, and the memory it holds for the KDF at resume.

The passphrase passes through this process (SPEC 4): locked in RAM (`mlockall`), never
dumped (not dumpable). The Argon2 KDF needs its memory at resume, when the dirty pages of
suspended disks cannot be written out to make room, so that memory is taken before.
"""

from __future__ import annotations

import ctypes
import mmap

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
PR_GET_DUMPABLE, PR_SET_DUMPABLE = 3, 4
# Never hold more than this for the KDF, nor more than half the RAM.
RESERVE_CAP_KIB = 1 << 20
_libc = ctypes.CDLL(None, use_errno=True)


def harden() -> None:
    # Not MCL_ONFAULT, though it would save 5-10 ms under TCG: under it the kernel also
    # skips MAP_POPULATE, and the KDF reserve would not be there at resume (issue 12).
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        raise OSError(ctypes.get_errno(), "mlockall")
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")


def lock_on_fault() -> None:
    """From here on, new memory is locked as each page is first touched, not all of it
    when mapped; what is locked stays locked. For KDFs that run at once after the wake
    (resume.Resumer.lock_on_fault): under plain MCL_FUTURE each KDF's mapping (and each
    thread's stack) is faulted in whole inside mmap(), holding the process's mmap lock, so
    they took turns at it (50-100 ms of a vCPU idle under TCG, issue 12). A page still
    cannot reach swap once it holds anything. `harden()` at the next arm puts MCL_FUTURE
    back, for the reserve."""
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        raise OSError(ctypes.get_errno(), "mlockall(MCL_ONFAULT)")


def hardening_status() -> dict[str, str]:
    """What the armed helper, its KDF reserve taken, looks like from /proc (for the record)."""
    out = {"dumpable": str(_libc.prctl(PR_GET_DUMPABLE, 0, 0, 0, 0))}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in ("VmLck", "VmRSS"):
                out[key] = value.strip()
    with open("/proc/self/oom_score_adj") as f:
        out["oom_score_adj"] = f.read().strip()
    return out


def mem_total_kib() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                return int(line.split()[1])
    return 0


def reserve_kib(kdf_memory_kib: int) -> int:
    """How much to reserve for a KDF that wants `kdf_memory_kib`, within the caps."""
    return min(kdf_memory_kib, RESERVE_CAP_KIB, mem_total_kib() // 2)


class Reserve:
    """Memory for the Argon2 KDF at resume: taken (and, under mlockall, faulted in) while
    the system is healthy, handed back just before the first resume attempt, when dirty
    pages of the suspended disks could not be written out to make room."""

    def __init__(self, kib: int) -> None:
        self.kib = kib
        self.area: mmap.mmap | None = None
        if kib > 0:
            # MAP_POPULATE: the kernel faults it in (writable, as it is private), with or
            # without mlockall; a loop touching each page took the sleep entry's CPU for
            # tenths of a second under TCG (issue 12).
            flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | mmap.MAP_POPULATE
            self.area = mmap.mmap(-1, kib * 1024, flags=flags)
            # Not in a child: a sync() child left behind on a dead server (power.py) would
            # hold it for as long as it lives.
            self.area.madvise(mmap.MADV_DONTFORK)

    def release(self) -> None:
        if self.area is not None:
            self.area.close()
            self.area = None
