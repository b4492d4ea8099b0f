"""A graphical session across a protected sleep (issue 15, acceptance 1): weston on DRM
(the pixman renderer on the guest's bochs-drm) in a logind seat session on tty2. A protected
`systemctl suspend` switches to the helper's prompt VT (the screendump shows the prompt, not
the compositor), the passphrase resumes, tty2 is the active VT again, the same weston
process owns it and the screen shows its output again.

bookworm only: weston is in bookworm's image (tests/vm/image.py), and trixie's suite is the
longer one. What is exercised of the kernel and logind here (VT switching away from a
session whose VT logind holds in VT_PROCESS mode for its controller) is also exercised on
both releases by every cycle that starts from tty1.

The session: a unit with PAMName=login on /dev/tty2 (pam_systemd registers it with logind),
made active with chvt; its leader then execs weston, which takes the seat through logind
(libseat).
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

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
# A background of our own colour: a screendump that shows it shows weston. No screen lock
# (idle-time), and no exit for want of an input device (the PS/2 keyboard and mouse are
# there, but weston's output is what is under test).
BACKGROUND = (0x33, 0x66, 0x99)
WESTON_INI = """[core]
idle-time=0
require-input=false
[shell]
background-color=0xff336699
locking=false
"""


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
    await g.run(f"useradd -m {USER} && install -d -o {USER} -m 0755 {RUN}")
    await g.write_file(f"{RUN}/session.sh", SESSION.encode(), 0o644)
    await g.write_file(f"{RUN}/weston.ini", WESTON_INI.encode(), 0o644)
    await g.run(
        f"systemd-run --unit=desk-session -p PAMName=login -p TTYPath=/dev/tty{VT} "
        f"-p StandardInput=tty -p StandardOutput=journal -p StandardError=journal "
        f"-p User={USER} /bin/sh {RUN}/session.sh"
    )
    await g.wait_for_command(f"test -e {RUN}/ready", 60, "the session's leader runs")
    await g.run(f"chvt {VT}")
    await g.wait_for_command(
        f"loginctl show-user {USER} -p State",
        60,
        f"{USER}'s session active on tty{VT}",
        ok=lambda o: o.strip() == "State=active",
    )
    await g.run(f"echo go > {RUN}/go")
    pid = await weston_pid(g)
    try:
        await g.until(lambda: _showing(g, "before"), 180, "weston's desktop on the screen")
    finally:
        # Shown with a failure: why weston did not come up.
        print((await g.run(f"cat {RUN}/weston.log", check=False)).stdout[-4000:])
    return pid


async def test_compositor_survives_a_protected_sleep(installed_guest: Guest) -> None:
    g = installed_guest
    await armed_ready(g)
    pid = await start_weston(g)
    assert await active_vt(g) == f"tty{VT}"

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


async def _showing(g: Guest, name: str) -> Counter[tuple[int, int, int]]:
    colours = await screen(g, name)
    # A "not yet" whose text the deadline's error shows.
    assert shows_compositor(colours), f"{name}: most common colours {colours.most_common(3)}"
    return colours
