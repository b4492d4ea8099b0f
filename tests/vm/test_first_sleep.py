"""Protected from the first sleep (issue 10, defect 1): a suspend right after the daemon
starts, and right after an input of the helper's RAM filesystem was replaced.

Before, the daemon said READY=1 at once and built the RAM filesystem afterwards (about 10 s
here), and a stale tree was rebuilt inside the arm window: both sleeps went through stock
systemd-sleep with the keys in RAM. Now READY=1 waits for the tree and the idle helper, and
a rebuild goes beside the tree in use and is swapped in after the sleep.
"""

from __future__ import annotations

import json

import pytest

from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.sleepcycle import (
    MANIFEST,
    PROMPT_NOTICE,
    UPTIME,
    armed_ready,
    assert_complete,
    boottime,
    last_cycle,
    run_cycle,
    suspend,
    wake,
)

pytestmark = [pytest.mark.vm, pytest.mark.asyncio, pytest.mark.timeout(900)]

DIGEST = f'python3 -c \'import json; print(json.load(open("{MANIFEST}"))["digest"])\''
LIBCRYPTSETUP = "/usr/lib/x86_64-linux-gnu/libcryptsetup.so.12"


async def protected_cycle(g: Guest, trigger: str, timeout: float) -> dict[str, object]:
    """`trigger` ends in a suspend; the prompt comes after wake, the passphrase opens both
    disks, and the record says each dm table key read as zeros while asleep."""
    since = await boottime(g)
    notices = g.console_count(PROMPT_NOTICE)
    to_suspend = await suspend(g, trigger, timeout)
    await wake(g, [layout.PASSPHRASE], notices=notices)
    rec = await last_cycle(g, since)
    timeline = assert_complete(rec)
    print(f"\n{trigger!r}: trigger->SUSPEND {to_suspend:.2f} s, timeline_ms {json.dumps(timeline)}")
    return rec


def first(lines: list[str], text: str, after: int = -1) -> int:
    found = [i for i, line in enumerate(lines) if i > after and text in line]
    assert found, f"{text!r} not in the daemon's journal after line {after}: {lines[after:]}"
    return found[0]


async def unprotected_lines(g: Guest) -> str:
    journal = await g.run("journalctl -b --no-pager -u cryptlockd.service -u systemd-suspend")
    return "\n".join(
        line
        for line in journal.stdout.splitlines()
        if "NOT protected" in line or "UNPROTECTED" in line or "although checks fail" in line
    )


@pytest.mark.vm_suites("bookworm")
async def test_suspend_right_after_start_is_protected(installed_guest: Guest) -> None:
    """`systemctl start` with no RAM filesystem, as at boot (/run is empty then: boot is the
    service starting with nothing built, the same path as here) and after `make install` +
    `enable --now`; then `systemctl suspend` at once. Bookworm only: what this adds to the
    cycle tests is the daemon's readiness, our code on sd_notify semantics that systemd 252
    and 257 share; test_replaced_input_then_immediate_suspend_is_protected runs on both."""
    g = installed_guest
    await armed_ready(g)
    await g.run(
        "systemctl stop cryptlockd.service cryptlockd-helper.service && "
        "umount /run/cryptlockd/ramfs && ! mountpoint -q /run/cryptlockd/ramfs && "
        f"! test -e {MANIFEST}"
    )
    # The guest's clock when `systemctl start` began, and when it returned (READY=1).
    trigger = (
        f"{UPTIME} > /root/t-start && systemctl start cryptlockd.service && "
        f"{UPTIME} > /root/t-started && systemctl suspend"
    )
    await protected_cycle(g, trigger, timeout=240)
    started = float((await g.run("cat /root/t-start")).stdout)
    ready = float((await g.run("cat /root/t-started")).stdout)
    print(f"systemctl start took {ready - started:.1f} s (RAM filesystem built, helper up)")
    # The suspend came at once (well within 2 s), yet nothing went unprotected.
    assert await unprotected_lines(g) == ""
    journal = await g.run("journalctl -b --no-pager -u cryptlockd.service -o cat")
    lines = journal.stdout.splitlines()
    swapped = max(i for i, line in enumerate(lines) if "swapped in" in line)
    running = max(i for i, line in enumerate(lines) if "running (armer" in line)
    assert swapped < running, "READY before the RAM filesystem was in place"


async def test_replaced_input_then_immediate_suspend_is_protected(installed_guest: Guest) -> None:
    """libcryptsetup replaced the way an upgrade does it (a new file renamed over the old
    one), and `systemctl suspend` in the same breath: the sleep is armed from the tree in use,
    the new tree is built beside it and swapped in after the sleep (the manifest changes), and
    the next sleep is protected from the new tree. Both releases: the swap is kernel mount
    work (a bind of a ramfs under the shared /run) and inotify."""
    g = installed_guest
    await armed_ready(g)
    before = (await g.run(DIGEST)).stdout.strip()
    replace = (
        f'f=$(readlink -f {LIBCRYPTSETUP}) && cp -a "$f" "$f.new" && touch "$f.new" && '
        'mv "$f.new" "$f"'
    )
    await protected_cycle(g, f"{replace} && systemctl suspend", timeout=90)
    assert await unprotected_lines(g) == ""
    after = await g.wait_for_command(
        DIGEST, 240, "the RAM filesystem rebuilt", ok=lambda o: o.strip() != before
    )
    await armed_ready(g)
    # The order, from the daemon's journal: the change seen, the sleep armed (from the tree
    # in use), the cycle over, and only then the new tree in.
    journal = await g.run("journalctl -b --no-pager -u cryptlockd.service -o cat")
    lines = journal.stdout.splitlines()
    changed = first(lines, "will be rebuilt")
    armed = first(lines, "armed in", changed)
    finished = first(lines, "cycle finished", armed)
    swapped = first(lines, "swapped in", changed)
    assert changed < armed < finished < swapped, lines[changed:]
    print("\n".join(lines[changed : swapped + 1]))
    cycle = await run_cycle(g, [layout.PASSPHRASE], "systemctl suspend")
    assert_complete(await last_cycle(g, cycle.since))
    assert (await g.run(DIGEST)).stdout.strip() == after.stdout.strip()
    assert await unprotected_lines(g) == ""
