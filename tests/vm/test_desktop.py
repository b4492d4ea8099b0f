"""A graphical session across a protected sleep (issue 15): weston on DRM (the pixman
renderer on the guest's bochs-drm) in a logind seat session on tty2.

Acceptance 1: a protected `systemctl suspend` switches to the helper's prompt VT (the
screendump shows the prompt, not the compositor), the passphrase resumes, tty2 is the
active VT again, the same weston process owns it and the screen shows its output again.

Acceptance 3: the session starts cryptlockd-notify by itself. Logging in starts the user's
systemd manager (pam_systemd); once weston is up, the session does what a systemd-aware
session manager does (gnome-session, startplasma, uwsm): it hands WAYLAND_DISPLAY and the
session bus to the user manager and starts its session target, which binds
graphical-session.target; `make install`'s link in /etc/systemd/user (`systemctl --global
enable`) makes that target start the agent. Nobody starts the agent by hand. Then
cryptlockd.service is restarted: the agent is the same process, it saw the daemon go and
come back, and it reacts to the next cycle's CycleFinished (its journal; the guest has no
notification server, which the agent waits for: acceptance 2 is tests/integration's, with
dunst).

bookworm only: weston is in bookworm's image (tests/vm/image.py), and trixie's suite is the
longer one. What is exercised of the kernel and logind here (VT switching away from a
session whose VT logind holds in VT_PROCESS mode for its controller) is also exercised on
both releases by every cycle that starts from tty1, and the user manager's targets and
--global links are the same on both.

The session: tests/vm/vt_session.py's on tty2; its leader waits until its VT is the active
one, then execs weston, which takes the seat through logind (libseat).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from cryptlockd.desktop.messages import WIPED_SUMMARY
from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.sleepcycle import (
    PROMPT_NOTICE,
    armed_ready,
    assert_complete,
    boottime,
    last_cycle,
    suspend,
)
from tests.vm.vt_session import start_vt_session

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio,
    pytest.mark.timeout(900),
    pytest.mark.vm_suites("bookworm"),
]

USER = "desk"
VT = 2
RUN = "/run/desk"
# The session's leader: waits until its VT is the active one, then becomes weston.
SESSION = f"""#!/bin/sh
cd {RUN} && mkfifo go && echo ready > ready || exit 1
read -r x < go
exec weston --config={RUN}/weston.ini --backend=drm-backend.so --use-pixman \\
    --log={RUN}/weston.log
"""
# weston starts its shell client once it is up; this one first does a session manager's
# part, then becomes weston's own shell client. Not in /run: the initramfs mounts it noexec.
SHELL_PATH = "/usr/local/libexec/desk-shell"
SHELL_CLIENT = f"""#!/bin/sh
systemctl --user import-environment WAYLAND_DISPLAY DBUS_SESSION_BUS_ADDRESS XDG_SESSION_ID
systemctl --user --no-block start {USER}-session.target
exec /usr/lib/x86_64-linux-gnu/weston-desktop-shell
"""
# What a desktop environment ships for its sessions (systemd.special(7)).
SESSION_TARGET = f"""[Unit]
Description={USER}'s weston session
BindsTo=graphical-session.target
Before=graphical-session.target
Wants=graphical-session-pre.target
After=graphical-session-pre.target
"""
# A background of our own colour: a screendump that shows it shows weston. No screen lock
# (idle-time), and no exit for want of an input device (the PS/2 keyboard and mouse are
# there, but weston's output is what is under test).
BACKGROUND = (0x33, 0x66, 0x99)
WESTON_INI = f"""[core]
idle-time=0
require-input=false
[shell]
background-color=0xff336699
locking=false
client={SHELL_PATH}
"""
AGENT = "cryptlockd-notify.service"
USERCTL = f"runuser -u {USER} -- env XDG_RUNTIME_DIR=/run/user/$(id -u {USER}) systemctl --user"
AGENT_LOG = f"journalctl -b -o cat --no-pager _SYSTEMD_USER_UNIT={AGENT}"


def screen_colours(path: Path) -> Counter[tuple[int, int, int]]:
    """The colours of a PPM (P6, 8 bits) screendump, every 7th pixel, counted."""
    data = path.read_bytes()
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:  # magic, width, height, maxval
        while data[pos : pos + 1].isspace():
            pos += 1
        end = pos
        while not data[end : end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    assert fields[0] == b"P6" and fields[3] == b"255", fields
    pixels = data[pos + 1 :]
    return Counter(
        (pixels[i], pixels[i + 1], pixels[i + 2]) for i in range(0, len(pixels) - 2, 3 * 7)
    )


async def screen(g: Guest, name: str) -> Counter[tuple[int, int, int]]:
    path = g.workdir / f"{name}.ppm"
    await g.qmp("screendump", {"filename": str(path), "format": "ppm"})
    return screen_colours(path)


def shows_compositor(colours: Counter[tuple[int, int, int]]) -> bool:
    """weston's desktop: mostly its background, with something on it (the panel)."""
    [(dominant, _)] = colours.most_common(1)
    return len(colours) > 2 and dominant == BACKGROUND


async def weston_pid(g: Guest) -> int:
    result = await g.wait_for_command(f"pgrep -u {USER} -x weston", 60, "weston runs")
    return int(result.stdout.split()[0])


async def active_vt(g: Guest) -> str:
    return (await g.run("cat /sys/class/tty/tty0/active")).stdout.strip()


async def start_weston(g: Guest) -> int:
    await g.write_file(f"/etc/systemd/user/{USER}-session.target", SESSION_TARGET.encode(), 0o644)
    await g.run(f"mkdir -p {SHELL_PATH.rsplit('/', 1)[0]}")
    await g.write_file(SHELL_PATH, SHELL_CLIENT.encode(), 0o755)
    await start_vt_session(g, USER, VT, RUN, SESSION, {"weston.ini": WESTON_INI})
    await g.run(f"echo go > {RUN}/go")
    pid = await weston_pid(g)
    try:
        await g.until(lambda: _showing(g, "before"), 180, "weston's desktop on the screen")
    finally:
        # Shown with a failure: why weston did not come up.
        print((await g.run(f"cat {RUN}/weston.log", check=False)).stdout[-4000:])
    return pid


async def agent_state(g: Guest) -> dict[str, str]:
    props = "-p ActiveState -p MainPID -p NRestarts -p WantedBy"
    out = (await g.run(f"{USERCTL} show {AGENT} {props}")).stdout
    return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)


async def agent_logged(g: Guest, text: str, count: int = 1) -> str:
    log = (await g.run(AGENT_LOG)).stdout
    assert log.count(text) >= count, f"{text!r} not {count} time(s) in:\n{log[-2000:]}"
    return log


async def agent_started_by_the_session(g: Guest) -> str:
    """The agent's MainPID, once the session has started it and it found the daemon."""

    async def active() -> dict[str, str]:
        state = await agent_state(g)
        assert state.get("ActiveState") == "active", state
        return state

    state = await g.until(active, 120, "cryptlockd-notify started in the session")
    assert "graphical-session.target" in state["WantedBy"].split(), state
    target = await g.run(f"{USERCTL} is-active graphical-session.target {USER}-session.target")
    assert target.stdout.split() == ["active", "active"], target.stdout
    await g.until(
        lambda: agent_logged(g, "cryptlockd is on the system bus"), 60, "the agent sees cryptlockd"
    )
    return state["MainPID"]


async def daemon_restart_survived(g: Guest, agent: str) -> None:
    await g.run("systemctl restart cryptlockd.service")
    await g.until(
        lambda: agent_logged(g, "cryptlockd is on the system bus", 2),
        120,
        "the agent sees the restarted cryptlockd",
    )
    await agent_logged(g, "cryptlockd left the system bus")
    state = await agent_state(g)
    assert (state["ActiveState"], state["MainPID"], state["NRestarts"]) == ("active", agent, "0")


async def test_compositor_survives_a_protected_sleep(installed_guest: Guest) -> None:
    g = installed_guest
    await armed_ready(g)
    pid = await start_weston(g)
    assert await active_vt(g) == f"tty{VT}"
    agent = await agent_started_by_the_session(g)
    await daemon_restart_survived(g, agent)
    await armed_ready(g)

    since = await boottime(g)
    notices = g.console_count(PROMPT_NOTICE)
    await suspend(g, "systemctl suspend")
    mark = g.event_mark()
    await g.wakeup()
    await g.wait_event("WAKEUP", 60, since=mark)
    await g.wait_console(PROMPT_NOTICE, 180, after=notices)
    # The helper's text prompt, on its own VT: not weston's picture.
    prompt = await screen(g, "prompt")
    assert len(prompt) > 1 and not shows_compositor(prompt), prompt.most_common(3)
    await g.type_text(layout.PASSPHRASE)
    await g.wait_agent(240, "agent after resume")

    rec = await last_cycle(g, since)
    assert_complete(rec)
    assert rec["vt"] != VT, rec["vt"]
    await g.wait_for_command(
        "cat /sys/class/tty/tty0/active",
        30,
        f"tty{VT} active again",
        ok=lambda o: o.strip() == f"tty{VT}",
    )
    assert await weston_pid(g) == pid, "weston was restarted"
    await g.until(lambda: _showing(g, "after"), 120, "weston's desktop back on screen")
    log = (await g.run(f"cat {RUN}/weston.log")).stdout
    assert "fatal" not in log.lower(), log[-3000:]
    # The same agent, after the daemon's restart, took the cycle's CycleFinished.
    await g.until(
        lambda: agent_logged(g, f"notice: {WIPED_SUMMARY}"), 60, "the agent's notice of the cycle"
    )
    assert (await agent_state(g))["MainPID"] == agent


async def _showing(g: Guest, name: str) -> Counter[tuple[int, int, int]]:
    colours = await screen(g, name)
    # A "not yet" whose text the deadline's error shows.
    assert shows_compositor(colours), f"{name}: most common colours {colours.most_common(3)}"
    return colours
