"""The helper's process hardening.

The passphrase passes through this process (SPEC 4): locked in RAM (`mlockall`), never
dumped (not dumpable).
"""

from __future__ import annotations

import contextlib
import ctypes
import os

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from collections.abc import Iterator

MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT = 1, 2, 4
PR_SET_PDEATHSIG, PR_GET_DUMPABLE, PR_SET_DUMPABLE = 1, 3, 4
_libc = ctypes.CDLL(None, use_errno=True)
# Whether harden() put the process under plain MCL_FUTURE (lock_on_fault ends that).
_populating = False


def harden() -> None:
    """Locked in RAM and not dumpable. Once is enough: nothing in the helper unlocks what
    is locked, so a helper hardened while idle (main.py) is still hardened at the arm, and
    this returns at once; only after lock_on_fault() does it lock again."""
    # Not MCL_ONFAULT, though it would save 5-10 ms under TCG: every page the helper maps
    # from here to the sleep must be in RAM before the disks are suspended. What is faulted
    # in later on purpose is mapped under mapped_unpopulated (reserve.py).
    global _populating
    if _populating:
        return
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE) != 0:
        raise OSError(ctypes.get_errno(), "mlockall")
    if _libc.prctl(PR_SET_DUMPABLE, 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_DUMPABLE)")
    _populating = True


@contextlib.contextmanager
def mapped_unpopulated() -> Iterator[None]:
    """Within it, memory mapped (a thread's stack too) is locked page by page as it is
    touched, not faulted in whole inside mmap() as harden()'s MCL_FUTURE would; memory
    mapped after it is again. Nothing changes for the mappings there already (no
    MCL_CURRENT). A no-op unless harden() is in force."""
    if not _populating:
        yield
        return
    if _libc.mlockall(MCL_FUTURE | MCL_ONFAULT) != 0:
        raise OSError(ctypes.get_errno(), "mlockall(MCL_FUTURE | MCL_ONFAULT)")
    try:
        yield
    finally:
        if _libc.mlockall(MCL_FUTURE) != 0:
            raise OSError(ctypes.get_errno(), "mlockall(MCL_FUTURE)")


def lock_on_fault() -> None:
    """From here on, new memory is locked as each page is first touched, not all of it
    when mapped; what is locked stays locked. For KDFs that run at once after the wake
    (resume.Resumer.lock_on_fault): under plain MCL_FUTURE each KDF's mapping (and each
    thread's stack) is faulted in whole inside mmap(), holding the process's mmap lock, so
    they took turns at it (50-100 ms of a vCPU idle under TCG, issue 12). A page still
    cannot reach swap once it holds anything. `harden()` at the next arm puts MCL_FUTURE
    back."""
    global _populating
    if _libc.mlockall(MCL_CURRENT | MCL_FUTURE | MCL_ONFAULT) != 0:
        raise OSError(ctypes.get_errno(), "mlockall(MCL_ONFAULT)")
    _populating = False


def set_parent_death_signal(sig: int, parent: int) -> None:
    """In a child of `parent` (the helper, which forked it from its main thread, alive as
    long as the helper is): `sig` when the helper ends, now if it has ended already."""
    if _libc.prctl(PR_SET_PDEATHSIG, sig, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG)")
    if os.getppid() != parent:
        os.kill(os.getpid(), sig)


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
