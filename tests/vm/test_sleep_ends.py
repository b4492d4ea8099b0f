"""Every sleep ends, and says how it went (issue 10, defects 5-7; acceptance 6 and 7), in the
guest: the daemon's state never stays `armed`, and a sleep the helper did not run shows in
LastCycle, CycleFinished and Problems as unprotected, with its reason.

To act while the daemon is armed but before the machine sleeps, the tests hold a second
delay inhibitor (systemd-inhibit on a fifo) with logind's InhibitDelayMaxSec raised: logind
has sent PrepareForSleep(true), the daemon has armed and let go of its own lock, and logind
waits for ours until the fifo is written.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.sleepcycle import (
    MANAGER,
    PROMPT_NOTICE,
    armed_ready,
    assert_complete,
    boottime,
    last_cycle,
    run_cycle,
    signals,
    suspend,
    wake,
    watch_signals,
)

pytestmark = [pytest.mark.vm, pytest.mark.asyncio, pytest.mark.timeout(900)]

LOGIND = "org.freedesktop.login1 /org/freedesktop/login1 org.freedesktop.login1.Manager"
HOLD_FIFO = "/run/test-hold-sleep"
HOLD = (
    "exec systemd-inhibit --what=sleep --mode=delay --who=cryptlockd-test "
    f"--why='hold the sleep' sh -c 'read x < {HOLD_FIFO}'"
)
NOT_PROTECTED = "last-cycle: the last sleep was NOT protected: "


async def state_is(g: Guest, state: str, timeout: float = 60) -> None:
    await g.wait_for_command(
        f"busctl get-property {MANAGER} State",
        timeout,
        f"State {state}",
        ok=lambda o: f'"{state}"' in o,
    )


async def problems(g: Guest) -> list[str]:
    out = await g.run(f"busctl --json=short get-property {MANAGER} Problems")
    return list(out.json()["data"])


async def long_delay(g: Guest) -> None:
    """logind waits up to 5 min for delay locks (ours is released within seconds)."""
    await g.run(
        "mkdir -p /run/systemd/logind.conf.d && printf '[Login]\\nInhibitDelayMaxSec=300\\n' "
        "> /run/systemd/logind.conf.d/test-delay.conf && systemctl kill -s HUP systemd-logind"
    )
    await g.wait_for_command(
        f"busctl get-property {LOGIND} InhibitDelayMaxUSec",
        30,
        "logind's longer delay",
        ok=lambda o: o.split()[-1] == "300000000",
    )


async def hold_and_suspend(g: Guest) -> None:
    """A second delay lock, then `systemctl suspend`: the daemon arms, logind waits."""
    await g.run(f"rm -f {HOLD_FIFO} && mkfifo {HOLD_FIFO}")
    await g.spawn(HOLD, "/root/hold.log")
    await g.wait_for_command(
        "systemd-inhibit --list --no-pager", 30, "the test's lock", ok=lambda o: "hold the" in o
    )
    await g.spawn("systemctl suspend", "/root/trigger.log")
    await state_is(g, "armed")


async def release(g: Guest) -> None:
    await g.run(f"echo go > {HOLD_FIFO}")


async def unprotected(g: Guest, since: float, reason: str) -> dict[str, Any]:
    """LastCycle of the sleep started after `since`: unprotected, `reason` first; Problems
    names it."""
    rec = await last_cycle(g, since)
    assert rec["result"] == "unprotected" and rec["success"] is False, rec
    assert str(rec["reason"]).startswith(reason), rec
    assert NOT_PROTECTED + str(rec["reason"]) in await problems(g), rec
    print(f"\nunprotected: {json.dumps(rec)}")
    return rec


async def daemon_pid(g: Guest) -> str:
    return (await g.run("systemctl show -p MainPID --value cryptlockd.service")).stdout.strip()


async def test_restarts_and_a_second_request_while_armed(installed_guest: Guest) -> None:
    """Acceptance 6, one guest: the daemon restarted while armed (and a second sleep
    request meanwhile), then logind restarted while armed: no wedge, State back to idle
    each time, and the sleep after is protected. Both releases: logind's restart and its
    handling of a pending sleep are systemd's."""
    g = installed_guest
    await armed_ready(g)
    await long_delay(g)
    await watch_signals(g)

    # 1. The daemon restarted while armed: the new one finds the sleep under way
    # (PreparingForSleep), arms the helper again, and gets the record.
    since = await boottime(g)
    await hold_and_suspend(g)
    old = await daemon_pid(g)
    await g.run("systemctl restart cryptlockd.service", timeout=120)
    assert await daemon_pid(g) != old
    await state_is(g, "armed")
    journal = await g.run("journalctl -b -u cryptlockd --no-pager -o cat")
    assert "a sleep is under way" in journal.stdout, journal.stdout[-3000:]
    # A second request during the sleep: logind refuses its own, we refuse ours (Busy).
    second = await g.run("systemctl suspend", check=False)
    # 252: "There's already a shutdown or sleep operation in progress"; 257: "Action
    # suspend already in progress, refusing requested suspend operation."
    assert second.rc != 0 and "already" in second.stderr, second
    assert "in progress" in second.stderr, second
    busy = await g.run(f"busctl call {MANAGER} Suspend", check=False)
    assert busy.rc != 0 and "a sleep is already in progress" in busy.stderr, busy
    mark = g.event_mark()
    notices = g.console_count(PROMPT_NOTICE)
    await release(g)
    await g.wait_event("SUSPEND", 90, since=mark)
    await wake(g, [layout.PASSPHRASE], notices=notices)
    rec = await last_cycle(g, since)
    assert_complete(rec)
    await state_is(g, "idle")
    [(ok, _)] = await signals(g, 1)
    assert ok is True

    # 2. logind restarted while armed: its PrepareForSleep(false) never comes. The daemon
    # stands the helper down, reports the sleep that did not happen, and is idle.
    since = await boottime(g)
    await hold_and_suspend(g)
    await g.run("systemctl restart systemd-logind.service")
    await state_is(g, "idle")
    await unprotected(g, since, "logind left the bus before the sleep ended")
    [_, (ok, sig)] = await signals(g, 2)
    assert ok is False and "logind left the bus" in json.dumps(sig)
    await release(g)  # the new logind knows of no sleep: nothing happens

    # 3. The next sleep is protected, and no sleep came of the one logind forgot.
    await armed_ready(g)
    cycle = await run_cycle(g, [layout.PASSPHRASE], "systemctl suspend")
    assert_complete(await last_cycle(g, cycle.since))
    assert [e.name for e in g.events[mark:]].count("SUSPEND") == 2
    assert not [p for p in await problems(g) if p.startswith(NOT_PROTECTED)]
    journal = await g.run("journalctl -b -u cryptlockd --no-pager -o cat")
    assert "while armed; ignored" not in journal.stdout


@pytest.mark.vm_suites("bookworm")
async def test_unprotected_sleeps_are_reported(installed_guest: Guest) -> None:
    """Acceptance 7, one guest: an arm failure (the helper's unit masked, the sleep entry's
    stock fallback), the stock fallback with the daemon stopped (its trace found at start),
    a drop-in that resets ExecStart= (the check says so; a suspend without a cycle), and a
    hybrid-sleep that does not happen (PrepareForSleep(false) without a cycle): each in
    LastCycle, CycleFinished(false) and Problems, then a protected sleep clears Problems.
    Bookworm only: what is under test is the daemon's report, the same on both releases;
    the systemd parts it relies on (a masked unit failing StartUnit, drop-in order,
    ExecStart= on D-Bus, PrepareForSleep(false) after a sleep service) are the same in 252
    and 257. (What hybrid-sleep does without swap is systemd's: 252 suspends instead.)"""
    g = installed_guest
    await armed_ready(g)
    await watch_signals(g)

    # 1. Arming fails: the helper's unit cannot be started. The sleep entry finds nothing
    # armed and runs the stock systemd-sleep; both reasons are in the record.
    await g.run(
        "systemctl stop cryptlockd-helper.service && "
        "systemctl mask --runtime cryptlockd-helper.service"
    )
    since = await boottime(g)
    await suspend(g, "systemctl suspend")
    await wake(g, what="the sleep after a failed arm")
    rec = await unprotected(g, since, "cannot arm the helper: ")
    assert "masked" in rec["reason"], rec
    assert rec["problems"][0].startswith("the sleep entry ran the stock systemd-sleep"), rec
    assert rec["slept"] is True
    [(ok, _)] = await signals(g, 1)
    assert ok is False
    await g.run(
        "systemctl unmask --runtime cryptlockd-helper.service && "
        "systemctl start cryptlockd-helper.service"
    )

    # 2. The stock fallback with the daemon stopped: the new daemon reports it at start.
    await g.run("systemctl stop cryptlockd.service")
    since = await boottime(g)
    await suspend(g, "systemctl suspend")
    await wake(g, what="the stock sleep")
    await g.run("systemctl start cryptlockd.service", timeout=120)
    rec = await unprotected(g, since, "the sleep entry ran the stock systemd-sleep: ")
    assert rec["problems"] == ["cryptlockd was not running (found at its start)"], rec
    await armed_ready(g)

    # 3. A later drop-in resets ExecStart=: the file is still there, the check reads what
    # systemd runs. The sleep is stock; PrepareForSleep(false) comes without a cycle.
    reset = "/run/systemd/system/systemd-suspend.service.d/zz-test-reset.conf"
    await g.run(
        f"mkdir -p $(dirname {reset}) && printf '[Service]\\nExecStart=\\n"
        f"ExecStart=/usr/lib/systemd/systemd-sleep suspend\\n' > {reset} && "
        "systemctl daemon-reload"
    )
    await g.wait_for_command(
        f"busctl get-property {MANAGER} Problems",
        60,
        "the drop-in not in effect",
        ok=lambda o: "sleep-drop-in:" in o and "systemd-sleep suspend" in o,
    )
    since = await boottime(g)
    await suspend(g, "systemctl suspend")
    await wake(g, what="the sleep past our drop-in")
    rec = await unprotected(g, since, "PrepareForSleep(false) came without a cycle")
    assert "slept" not in rec, rec  # the daemon cannot tell
    await g.run(f"rm {reset} && systemctl daemon-reload")
    await armed_ready(g)

    # 4. hybrid-sleep: logind (told not to check for swap) sends PrepareForSleep(true) and
    # starts systemd-hybrid-sleep.service, whose systemd-sleep (252), unable to hibernate
    # without swap, suspends to RAM instead: a real sleep that our entry never saw.
    await g.run(
        "mkdir -p /run/systemd/system/systemd-logind.service.d && printf '[Service]\\n"
        "Environment=SYSTEMD_BYPASS_HIBERNATION_MEMORY_CHECK=1\\n' > "
        "/run/systemd/system/systemd-logind.service.d/test-hibernate.conf && "
        "systemctl daemon-reload && systemctl restart systemd-logind.service"
    )
    await armed_ready(g)
    since = await boottime(g)
    await suspend(g, "systemctl hybrid-sleep")
    await wake(g, what="the hybrid sleep")
    rec = await unprotected(g, since, "PrepareForSleep(false) came without a cycle")
    assert [ok for ok, _ in await signals(g, 4)] == [False] * 4
    units = await g.run("journalctl -b -u systemd-hybrid-sleep.service --no-pager -o cat")
    print(f"\nsystemd-hybrid-sleep.service:\n{units.stdout[-1500:]}")

    # 5. A protected sleep: Problems no longer names an unprotected one.
    await armed_ready(g)
    cycle = await run_cycle(g, [layout.PASSPHRASE], "systemctl suspend")
    assert_complete(await last_cycle(g, cycle.since))
    assert not [p for p in await problems(g) if p.startswith(NOT_PROTECTED)]
