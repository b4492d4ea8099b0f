"""Counts byte strings in a guest RAM dump (hundreds of MiB: mmap, no copy)."""

from __future__ import annotations

import mmap
from collections.abc import Iterable
from pathlib import Path


def count_occurrences(dump: Path, needles: Iterable[bytes]) -> dict[bytes, int]:
    """How often each needle occurs in the file (overlapping occurrences counted).

    For an AES-XTS volume key, pass its two 32-byte halves, not the whole 64 bytes: the kernel
    keeps only the halves, each at the start of its own AES key schedule (SPEC section 6).
    """
    wanted = list(dict.fromkeys(needles))
    if any(not n for n in wanted):
        raise ValueError("empty needle")
    counts = dict.fromkeys(wanted, 0)
    with dump.open("rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mem:
        for needle in wanted:
            pos = mem.find(needle)
            while pos != -1:
                counts[needle] += 1
                pos = mem.find(needle, pos + 1)
    return counts
