from __future__ import annotations

import pytest

from cryptlockd.helper import page_cache
from cryptlockd.helper.page_cache import CHUNK, meminfo_kib, scrub_bytes

MEMINFO = """MemTotal:         503412 kB
MemFree:          361204 kB
MemAvailable:     402312 kB
"""


def test_meminfo_fields() -> None:
    assert meminfo_kib(MEMINFO, "MemFree") == 361204
    assert meminfo_kib(MEMINFO, "MemTotal") == 503412
    with pytest.raises(ValueError, match="no Cached"):
        meminfo_kib(MEMINFO, "Cached")


def test_scrub_takes_the_free_memory_but_a_margin_in_whole_chunks() -> None:
    # 512 MiB of RAM: the margin is 32 MiB (1/16), the rest in 8 MiB chunks.
    size = scrub_bytes(361204, 512 << 10)
    assert size % CHUNK == 0
    assert (361204 - (32 << 10)) * 1024 - CHUNK < size <= (361204 - (32 << 10)) * 1024
    # 16 GiB: 1 GiB stays free.
    assert scrub_bytes(8 << 20, 16 << 20) == (7 << 30)
    # Less free than the margin: nothing.
    assert scrub_bytes(20 << 10, 512 << 10) == 0


def test_scrub_clears_and_gives_back(monkeypatch: pytest.MonkeyPatch) -> None:
    # Four chunks' worth above the margin, on this machine's own memory.
    free_kib = page_cache.MARGIN_MIN_KIB + 4 * CHUNK // 1024
    monkeypatch.setattr(
        page_cache,
        "_read_meminfo",
        lambda: f"MemTotal: {page_cache.MARGIN_MIN_KIB * 2} kB\nMemFree: {free_kib} kB\n",
    )
    assert page_cache.scrub_free_memory() == 4 * CHUNK
