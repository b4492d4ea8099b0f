"""The memory the Argon2 KDF needs at resume, held from the arm to the first resume.

At resume the dirty pages of suspended disks cannot be written out to make room, so the
KDF's memory is taken before, while the system is healthy. It is mapped when armed, but
faulted in by a thread of its own at the lowest priority (issue 12): right after `armed`,
logind and PID 1 start the sleep entry, and a helper that faulted in tens of MiB at nice
-10 took a CPU from them (75-200 ms under TCG), and could not answer the sleep entry's
`begin` until it was done. At `begin` the thread gets the helper's priority back
(`hurry`), and the cycle waits for it (`ready`) before it suspends the first device.

Small steps: each holds the process's mmap lock for reading, and a step of a thread at
nice 19 may wait long for a CPU, while the main thread's next mmap() would wait for it.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import threading

from cryptlockd.helper.hardening import mapped_unpopulated
from cryptlockd.helper.protocol import boottime

# Never hold more than this for the KDF, nor more than half the RAM.
RESERVE_CAP_KIB = 1 << 20
STEP = 256 << 10
FILL_NICE = 19
PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
MADV_DONTFORK = 10
MADV_POPULATE_WRITE = 23  # Linux 5.14

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [
    ctypes.c_void_p,
    ctypes.c_size_t,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_int,
    ctypes.c_long,
]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MAP_FAILED = ctypes.c_void_p(-1).value


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
    """`kib` of memory, mapped (locked as touched, under the helper's mlockall) but not
    faulted in: `start_filling` does that in a thread, `ready` waits for it, `release`
    hands the memory back (just before the first resume attempt)."""

    def __init__(self, kib: int) -> None:
        self.kib = kib
        self.size = kib * 1024
        self.address = 0
        self.filled = 0
        self.filled_at: float | None = None
        self.error = ""
        self._stop = False
        self._thread: threading.Thread | None = None
        self._hurry = False
        self._nice = 0
        if self.size <= 0:
            return
        prot, flags = PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS
        with mapped_unpopulated():
            address = _libc.mmap(None, self.size, prot, flags, -1, 0)
        if address in (None, MAP_FAILED):
            raise OSError(ctypes.get_errno(), f"mmap of {kib} KiB")
        self.address = address
        # Not in a child: a sync() child left behind on a dead server (power.py) would
        # hold it for as long as it lives.
        if _libc.madvise(address, self.size, MADV_DONTFORK) != 0:
            err = ctypes.get_errno()
            self.release()
            raise OSError(err, "madvise(MADV_DONTFORK)")

    def start_filling(self) -> None:
        """Faults it in from a thread at nice 19, which notes when it is all in
        (`filled_at`, boottime; now if it is already). Start no child process while it
        runs."""
        if self._thread is not None:
            return
        if self.filled >= self.size:
            self.filled_at = boottime()
            return
        self._nice = os.getpriority(os.PRIO_PROCESS, 0)
        self._thread = threading.Thread(target=self._run, name="kdf-reserve", daemon=True)
        # Its stack too is locked as touched, not faulted in whole (8 MiB) by mmap().
        with mapped_unpopulated():
            self._thread.start()

    def _run(self) -> None:
        tid = threading.get_native_id()
        try:
            os.setpriority(os.PRIO_PROCESS, tid, FILL_NICE)
            # After the drop: a `ready` that came first has set _hurry, and this puts the
            # priority back whichever of the two ran first.
            if self._hurry:
                os.setpriority(os.PRIO_PROCESS, tid, self._nice)
        except OSError:
            pass  # it still fills, at the helper's priority
        self._fill()

    def _fill(self) -> None:
        populate = True
        while self.filled < self.size and not self._stop:
            n = min(STEP, self.size - self.filled)
            at = self.address + self.filled
            if populate and _libc.madvise(at, n, MADV_POPULATE_WRITE) != 0:
                err = ctypes.get_errno()
                if err != errno.EINVAL:
                    self.error = f"faulting in the KDF reserve: {os.strerror(err)}"
                    return
                populate = False  # a kernel before 5.14: a write faults it in
            if not populate:
                ctypes.memset(at, 0, n)
            self.filled += n
        if self.filled >= self.size:
            self.filled_at = boottime()

    def hurry(self) -> None:
        """The thread back at the helper's priority: once the sleep entry runs, logind
        and PID 1 are done, and what is left of the reserve would hold up the suspends."""
        if self._thread is None:
            return
        self._hurry = True
        tid = self._thread.native_id
        if tid is not None:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, tid, self._nice)

    def _hurry_and_join(self, timeout: float) -> bool:
        """False when the thread is still at it after `timeout` seconds."""
        if self._thread is not None:
            self.hurry()
            self._thread.join(timeout)
            return not self._thread.is_alive()
        return True

    def ready(self, timeout: float) -> str:
        """Waits until it is all in, the thread back at the caller's priority (or fills it
        here when no thread was started), `timeout` seconds at most: nothing may wait
        without a bound before the sleep (SPEC 2.8). Returns why it is not all in, ""
        when it is."""
        if self._thread is None:
            self._fill()
        if not self._hurry_and_join(timeout):
            return (
                f"not all in after {timeout:g} s "
                f"({self.filled >> 20} of {self.size >> 20} MiB faulted in)"
            )
        return self.error

    def release(self, timeout: float = 1.0) -> None:
        self._stop = True
        if not self._hurry_and_join(timeout):
            # Stuck in the kernel on the range: munmap() would wait for it too. The helper
            # ends with the cycle, and the memory with it.
            return
        self._thread = None
        if self.address:
            _libc.munmap(self.address, self.size)
            self.address = 0
        self.filled = 0
