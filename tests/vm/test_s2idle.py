"""A protected cycle in s2idle (issue 11, acceptance 9): the sleep most laptops since about
2020 offer only.

QEMU's system_wakeup wakes S3 only: in s2idle the guest stays "running" for QEMU, with its
CPUs idle, and no SUSPEND or WAKEUP event comes. What wakes it is a wakeup-enabled
interrupt: the i8042 keyboard port, once its wakeup is enabled, and a key pressed with QMP
send-key. The host knows the guest is asleep from the kernel's "PM: suspend entry
(s2idle)" line on the serial console, and that it woke from the prompt notice.
"""

from __future__ import annotations

import json

import pytest

from tests.vm import layout
from tests.vm.guest import Guest, GuestError
from tests.vm.sleepcycle import MANAGER, PROMPT_NOTICE, armed_ready, boottime, last_cycle

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio,
    pytest.mark.timeout(900),
    # Both releases: s2idle is the kernel's own suspend path (6.1 and 6.12 differ there).
    pytest.mark.vm_suites("bookworm", "trixie"),
]

ENTRY = "PM: suspend entry (s2idle)"
QUIET = 15.0  # seconds the guest must stay asleep before the key


async def test_a_protected_cycle_in_s2idle_woken_by_a_key(installed_guest: Guest) -> None:
    g = installed_guest
    offered = (await g.run("cat /sys/power/mem_sleep")).stdout
    if "s2idle" not in offered:
        pytest.skip(f"this guest kernel offers no s2idle: {offered.strip()}")
    await g.run(
        "echo s2idle > /sys/power/mem_sleep && "
        "echo enabled > /sys/bus/serio/devices/serio0/power/wakeup"
    )
    # The daemon reads mem_sleep when it arms: nothing to reload.
    await armed_ready(g)
    since = await boottime(g)
    entries = g.console_count(ENTRY)
    notices = g.console_count(PROMPT_NOTICE)
    await g.spawn(f"busctl call {MANAGER} Suspend", "/root/trigger.log")
    await g.wait_console(ENTRY, 120, after=entries)
    assert await g.status() == "running"  # s2idle: not QEMU's suspended state
    # Asleep for real: nothing wakes it but the key (no prompt comes by itself).
    with pytest.raises(GuestError, match="on the console"):
        await g.wait_console(PROMPT_NOTICE, QUIET, after=notices)
    await g.send_keys("shift")
    await g.wait_console(PROMPT_NOTICE, 240, after=notices)
    await g.type_text(layout.PASSPHRASE)
    # Once in a cold run the first line came out wrong (attempt 2, cause not found; the
    # suspect is the wake key's shift, pressed while the i8042 wakes the guest, whose
    # release the keyboard may miss): the prompt asks again and the passphrase is typed
    # once more. Protection is what this test is about, and the record says it either way.
    try:
        await g.wait_console(PROMPT_NOTICE, 20, after=notices + 1)
    except GuestError:
        pass
    else:
        await g.screendump("s2idle-second-prompt")
        await g.send_keys("shift")
        await g.type_text(layout.PASSPHRASE)
    await g.wait_agent(240, "agent after the s2idle resume")
    rec = await last_cycle(g, since)
    print(f"\ns2idle cycle record: {json.dumps(rec, sort_keys=True)}")
    assert rec["success"] is True and rec["slept"] is True, rec
    assert set(rec["resumed"]) == {layout.ROOT_DM_NAME, layout.DATA_DM_NAME}
    for dm in rec["suspended"]:
        assert rec["verification"][dm]["dm_table_key"] == "zeroed", rec["verification"]
    t = rec["timeline_ms"]
    assert t["woke"] - t["sleep_write"] >= QUIET * 1000, t
    mem = (await g.run("cat /sys/power/mem_sleep")).stdout
    assert "[s2idle]" in mem, mem
