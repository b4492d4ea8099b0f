"""Suspend() with the caller's rights on a real logind (issue 10, defect 8, acceptance 8):
an unprivileged user with an active session on the guest's seat calls Suspend() while
another process holds a block inhibitor: refused, the error names the inhibitor, the
machine stays awake. Without the inhibitor the same call suspends, protected.

trixie only: the rules mirrored are those of logind 257 (block inhibitors refuse outright);
the daemon-side logic is the same on every release and is unit-tested.

The user's session: tests/vm/vt_session.py's, on /dev/tty5. polkit resolves the caller's
bus name to its process and session, so the calls must come from inside that session: the
session's leader runs each line written to a fifo.
"""

from __future__ import annotations

import pytest

from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.sleepcycle import (
    MANAGER,
    armed_ready,
    assert_complete,
    boottime,
    last_cycle,
    suspend,
    wake,
)
from tests.vm.vt_session import start_vt_session

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio,
    pytest.mark.timeout(900),
    pytest.mark.vm_suites("trixie"),
]

USER = "tester"
VT = 5
RUN = "/run/tester"
# The session's leader: runs "N command" lines from the fifo, output to out.N, status rc.N.
SESSION = f"""#!/bin/sh
cd {RUN} && mkfifo cmd && echo ready > ready || exit 1
while :; do
    if read -r line < cmd; then
        n=${{line%% *}}
        sh -c "${{line#* }}" > out.$n 2>&1
        echo $? > rc.$n
    fi
done
"""
CALL = f"busctl call {MANAGER} Suspend"
WHY = "test upgrade in progress"


async def in_session(g: Guest, n: int, command: str) -> tuple[int, str]:
    """Runs `command` in the user's session; its exit status and output."""
    await g.run(f"echo '{n} {command}' > {RUN}/cmd")
    rc = await g.wait_for_command(f"cat {RUN}/rc.{n}", 60, f"command {n} in the session")
    out = await g.run(f"cat {RUN}/out.{n}")
    return int(rc.stdout), out.stdout.strip()


async def test_a_users_suspend_is_refused_while_an_inhibitor_blocks(
    installed_guest: Guest,
) -> None:
    g = installed_guest
    await armed_ready(g)
    await start_vt_session(g, USER, VT, RUN, SESSION)
    # A package manager's lock, taken by another process (root's).
    pid = await g.spawn(
        f"exec systemd-inhibit --what=sleep --mode=block --who=upgrader --why='{WHY}' "
        "sleep infinity",
        "/root/inhibit.log",
    )
    await g.wait_for_command(
        "systemd-inhibit --list --no-pager", 30, "the block inhibitor", ok=lambda o: WHY in o
    )
    named = f"'upgrader' (pid {pid}, uid 0): {WHY}"

    mark = g.event_mark()
    rc, out = await in_session(g, 1, CALL)
    assert rc != 0 and f"a block inhibitor holds off sleep: {named}" in out, out
    rc, out = await in_session(g, 2, "cryptlockctl suspend")
    assert (rc, out) == (
        1,
        "cryptlockctl: Suspend failed: org.cryptlockd1.Error.Inhibited: "
        f"a block inhibitor holds off sleep: {named}",
    )
    state = await g.run(f"busctl get-property {MANAGER} State")
    assert state.stdout.strip() == 's "idle"'
    assert "SUSPEND" not in [e.name for e in g.events[mark:]], "the machine slept"
    journal = await g.run("journalctl -b -u cryptlockd --no-pager")
    assert f"blocked by {named}" in journal.stdout

    # The inhibitor gone, the same user's call suspends, protected.
    await g.run(f"kill {pid}")
    await g.wait_for_command(
        "systemd-inhibit --list --no-pager", 30, "no inhibitor", ok=lambda o: WHY not in o
    )
    since = await boottime(g)
    await suspend(g, f"echo '3 {CALL}' > {RUN}/cmd")
    await wake(g, [layout.PASSPHRASE])
    assert_complete(await last_cycle(g, since))
    assert (await g.run(f"cat {RUN}/rc.3")).stdout.strip() == "0"
