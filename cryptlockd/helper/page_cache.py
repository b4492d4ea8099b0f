"""The clean page cache dropped before the devices are suspended (issue 14; off by default).

The page cache holds the plaintext of every file read lately, and the volume key's wipe
does nothing about it (SPEC 4: not protected). Writing 1 to drop_caches frees the clean
pages, but the kernel does not clear a page it frees (unless booted with init_on_free=1;
Debian's kernels clear on allocation), so their contents stay in RAM until the page is used
again. So after the drop
the helper takes most of the free memory, which the kernel clears page by page as it hands
it over, and gives it back at once. The kernel's free lists are last in, first out: the
pages just freed are the first handed out. Each CPU keeps a short list of its own freed
pages, handed out only to allocations on that CPU: the chunks are taken on each CPU in turn.

The price: every file the system reads after resume comes from the disk again.
"""

from __future__ import annotations

import mmap
import os

DROP_CACHES = "/proc/sys/vm/drop_caches"
MEMINFO = "/proc/meminfo"
PAGE = mmap.PAGESIZE
CHUNK = 8 << 20
# Left free by the scrub: room above the kernel's watermarks, so that taking the memory
# makes kswapd reclaim or swap nothing of the frozen processes' (nor the OOM killer run).
MARGIN_MIN_KIB = 32 << 10
MARGIN_SHARE = 16  # and at least 1/16 of RAM


def meminfo_kib(text: str, field: str) -> int:
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name == field:
            return int(rest.split()[0])
    raise ValueError(f"no {field} in {MEMINFO}")


def scrub_bytes(free_kib: int, total_kib: int) -> int:
    """How much free memory to take and clear, whole chunks, the margin left free."""
    margin = max(MARGIN_MIN_KIB, total_kib // MARGIN_SHARE)
    return max(0, (free_kib - margin) * 1024 // CHUNK * CHUNK)


def _read_meminfo() -> str:
    with open(MEMINFO) as f:
        return f.read()


def scrub_free_memory() -> int:
    """Takes and clears most free pages, then frees them again; returns the bytes cleared.
    Stops early when the kernel refuses memory (with mlockall(MCL_FUTURE), each mapping
    is locked and populated at once)."""
    info = _read_meminfo()
    want = scrub_bytes(meminfo_kib(info, "MemFree"), meminfo_kib(info, "MemTotal"))
    chunks: list[mmap.mmap] = []
    taken = 0
    cpus = sorted(os.sched_getaffinity(0))
    try:
        while taken < want:
            os.sched_setaffinity(0, {cpus[len(chunks) % len(cpus)]})
            try:
                m = mmap.mmap(-1, CHUNK, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
            except OSError:
                break
            chunks.append(m)
            # A write fault on each page: the kernel hands over a cleared page (a read
            # would only map the shared zero page).
            m[0:CHUNK:PAGE] = bytes(CHUNK // PAGE)
            taken += CHUNK
    finally:
        os.sched_setaffinity(0, cpus)
        for m in chunks:
            m.close()
    return taken


def drop_page_cache() -> int:
    """After the sync and the freeze: every dirty page is written by now, and nothing runs
    that could read a file back in. Returns the bytes scrubbed."""
    with open(DROP_CACHES, "w") as f:
        f.write("1")
    return scrub_free_memory()
