"""Lock without sleeping, and the plaintext page cache (issue 14, acceptance 3 and 4).

bookworm only: what these add to the cycle (no sleep write; drop_caches and the scrub of
the freed pages) does not depend on the release's kernel or systemd beyond what the cycle
tests prove on both; the RAM dumps are QEMU's.

- `cryptlockctl lock` from a non-root user without the right: polkit says no, one readable
  line, exit 1, nothing changes. Then from root: the helper freezes, suspends and verifies
  without S3 (no QMP SUSPEND; the guest keeps running, and a dump of its RAM at the prompt
  holds no volume key), the prompt shows, the passphrase resumes, everything thaws, and
  the record is a lock's.
- A file of known content, read before a protected sleep: a dump of the sleeping guest's
  RAM finds it without the page-cache option (the control), and not with it.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import pytest

from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.memscan import count_occurrences
from tests.vm.sleepcycle import (
    MANAGER,
    PROMPT_NOTICE,
    armed_ready,
    boottime,
    last_cycle,
    signals,
    suspend,
    unlock,
    wake,
    watch_signals,
)
from tests.vm.test_wipe import scan, volume_keys

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio,
    pytest.mark.timeout(900),
    pytest.mark.vm_suites("bookworm"),
]

USER = "tester"
LAST_CYCLE = f"busctl --json=short get-property {MANAGER} LastCycle"
DIRECT_READ = "dd if=/dev/mapper/{} of=/dev/null bs=4096 count=1 iflag=direct"
PAGE = 4096
FILE_PAGES = 64


def content(seed: str) -> bytes:
    """The known file: pseudo-random, so no page of it is anywhere else by chance."""
    return hashlib.shake_256(seed.encode()).digest(FILE_PAGES * PAGE)


def needles(data: bytes) -> list[bytes]:
    # 48 bytes from inside each page: whatever copy survives, it is page-aligned.
    return [data[i * PAGE + 1000 : i * PAGE + 1048] for i in range(FILE_PAGES)]


async def write_and_read(g: Guest, path: str, seed: str) -> bytes:
    """Writes the file in the guest (the host never sends its content through the agent),
    syncs it and reads it back through the page cache."""
    data = content(seed)
    await g.run(
        f"python3 -c 'import hashlib,sys; sys.stdout.buffer.write("
        f'hashlib.shake_256(b"{seed}").digest({len(data)}))\' > {path} && sync'
    )
    out = await g.run(f"sha256sum {path} && cat {path} > /dev/null")
    assert out.stdout.split()[0] == hashlib.sha256(data).hexdigest()
    return data


@pytest.mark.asyncio
async def test_lock_without_sleeping_and_refused_without_the_right(installed_guest: Guest) -> None:
    g = installed_guest
    await armed_ready(g)
    keys = await volume_keys(g)
    before = (await g.run(LAST_CYCLE)).stdout

    # A user without org.cryptlockd1.lock (no active session: polkit's allow_any).
    await g.run(f"useradd -m {USER}")
    mark = g.event_mark()
    denied = await g.run(f"runuser -u {USER} -- cryptlockctl lock 2>&1", check=False)
    assert denied.rc == 1, denied
    line = denied.stdout.strip()
    assert line.startswith("cryptlockctl: Lock failed: org.cryptlockd1.Error.NotAuthorized"), line
    assert "\n" not in line
    assert (await g.run(f"busctl get-property {MANAGER} State")).stdout.strip() == 's "idle"'
    assert (await g.run(LAST_CYCLE)).stdout == before, "a refused Lock() changed LastCycle"
    journal = await g.run("journalctl -b -u cryptlockd --no-pager")
    assert "lock requested" not in journal.stdout

    # root locks: the cycle without the sleep.
    await watch_signals(g)
    since = await boottime(g)
    notices = g.console_count(PROMPT_NOTICE)
    await g.spawn("cryptlockctl lock", "/root/lock.log")
    await g.wait_console(PROMPT_NOTICE, 180, after=notices)
    assert await g.status() == "running"
    # At the prompt, the disks' keys are gone from the running machine's RAM.
    counts = scan(await g.dump_memory("locked"), keys)
    assert all(n == 0 for n in counts.values()), counts
    await unlock(g, [layout.PASSPHRASE], notices)
    await g.wait_agent(240, "agent after the lock")
    assert "SUSPEND" not in [e.name for e in g.events[mark:]], "Lock() slept"

    rec = await last_cycle(g, since)
    assert rec["action"] == "lock" and rec["success"] is True, rec
    assert rec["slept"] is False
    assert set(rec["suspended"]) == {layout.ROOT_DM_NAME, layout.DATA_DM_NAME}
    assert set(rec["resumed"]) == set(rec["suspended"])
    for dm in rec["suspended"]:
        assert rec["verification"][dm]["dm_table_key"] == "zeroed", rec["verification"]
    steps = rec["timeline_ms"]
    assert "sleep_write" not in steps and "woke" not in steps, steps
    order = ["frozen", f"suspended:{layout.DATA_DM_NAME}", "verified", "locked", "prompt"]
    order += [f"resumed:{layout.ROOT_DM_NAME}", "thawed"]
    assert [steps[s] for s in order] == sorted(steps[s] for s in order), steps
    [(success, signalled)] = await signals(g, 1)
    assert success is True and signalled["action"]["data"] == "lock"
    # Everything thawed and back: the agent answers (it was frozen), the disks read.
    for dm in (layout.ROOT_DM_NAME, layout.DATA_DM_NAME):
        await g.run(DIRECT_READ.format(dm))
    assert (await g.run(f"busctl get-property {MANAGER} State")).stdout.strip() == 's "idle"'
    assert (await g.run("cat /root/lock.log")).stdout == "", "cryptlockctl lock said something"


async def sleep_with_file(g: Guest, seed: str) -> tuple[list[int], dict[str, Any]]:
    """A protected sleep after reading a file of known content: how often each page's
    needle is in the sleeping guest's RAM, and the cycle's record."""
    data = await write_and_read(g, f"/root/{seed}", seed)
    since = await boottime(g)
    notices = g.console_count(PROMPT_NOTICE)
    await suspend(g, "systemctl suspend", 120)
    dump = await g.dump_memory(seed)
    try:
        counts = count_occurrences(dump, needles(data))
    finally:
        dump.unlink()
    await wake(g, [layout.PASSPHRASE], notices=notices)
    return [counts[n] for n in needles(data)], await last_cycle(g, since)


@pytest.mark.asyncio
async def test_page_cache_dropped_before_the_sleep(installed_guest: Guest) -> None:
    g = installed_guest
    await armed_ready(g)

    # The control: without the option, the file's pages are still in RAM while asleep.
    counts, rec = await sleep_with_file(g, "control")
    assert rec["success"] is True, rec
    assert "page_cache_dropped" not in rec["timeline_ms"]
    found = sum(1 for n in counts if n)
    assert found > FILE_PAGES // 2, f"only {found} of {FILE_PAGES} pages found in the control"

    await g.run(
        "mkdir -p /etc/cryptlockd/cryptlockd.conf.d && printf '[cycle]\\ndrop_page_cache = "
        "true\\n' > /etc/cryptlockd/cryptlockd.conf.d/50-test.conf && cryptlockctl reload"
    )
    counts, rec = await sleep_with_file(g, "dropped")
    assert rec["success"] is True, rec
    steps = rec["timeline_ms"]
    assert steps["filesystems_synced"] <= steps["page_cache_dropped"], steps
    assert steps["page_cache_dropped"] <= steps[f"suspended:{layout.DATA_DM_NAME}"], steps
    assert rec["page_cache_cleared_mib"] > 0, rec
    left = [i for i, n in enumerate(counts) if n]
    assert not left, f"pages {left} of the file were still in RAM while asleep: {rec}"
    # The file itself is intact (read from the disk again).
    out = await g.run("sha256sum /root/dropped")
    assert out.stdout.split()[0] == hashlib.sha256(content("dropped")).hexdigest()
    print(f"\npage cache dropped, {rec['page_cache_cleared_mib']} MiB cleared: {json.dumps(steps)}")
