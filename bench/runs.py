"""One measured sleep cycle of each system, driven from the host.

All three share the host side: the request (`systemctl suspend` through the agent) to QMP
SUSPEND, then `system_wakeup` at once, and from QMP WAKEUP the moment the guest is usable:
one agent command that reads a block of every LUKS mapping with O_DIRECT (past the page
cache, so through dm-crypt). The agent is frozen with the rest of the guest until the
system thaws, so its answer marks the end of the cycle.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import numpy as np

from bench.debian import VT
from bench.figures import CycleResult
from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.sleepcycle import (
    PROMPT_NOTICE,
    armed_ready,
    assert_complete,
    boottime,
    last_cycle,
)

TRIGGER = "systemctl suspend"
# A prompt counts as shown once this many pixels differ from the screen at SUSPEND (a text
# line of ~25 characters lights several hundred; a blinking cursor about 16).
PROMPT_PIXELS = 300
PROMPT_STABLE = 1.5  # seconds without a change larger than the cursor's blink
CURSOR_PIXELS = 50
# Typed and nothing came back in this time: the prompt was not reading yet; type again.
RETYPE_AFTER = 20.0


def usable_command(cycle: int) -> str:
    """Direct reads of one 4 KiB block of each mapping, a different block each cycle."""
    return " && ".join(
        f"dd if=/dev/mapper/{dm} of=/dev/null bs=4096 count=1 skip={1000 + cycle * 7} "
        "iflag=direct status=none"
        for dm in (layout.ROOT_DM_NAME, layout.DATA_DM_NAME)
    )


async def _sleep(g: Guest, host: dict[str, float]) -> float:
    """Requests the sleep and waits for QMP SUSPEND; returns the request's host time."""
    mark = g.event_mark()
    start = time.monotonic()
    await g.spawn(TRIGGER, "/root/trigger.log")
    event = await g.wait_event("SUSPEND", 120, since=mark)
    host["suspend"] = event.monotonic - start
    return start


async def _wake(g: Guest, host: dict[str, float], start: float, cycle: int) -> asyncio.Task[object]:
    mark = g.event_mark()
    await g.wakeup()
    event = await g.wait_event("WAKEUP", 60, since=mark)
    host["wakeup"] = event.monotonic - start
    return asyncio.create_task(g.run(usable_command(cycle), timeout=600))


async def stock_cycle(g: Guest, mode: str, cycle: int) -> CycleResult:
    host: dict[str, float] = {}
    start = await _sleep(g, host)
    usable = await _wake(g, host, start, cycle)
    await usable
    host["usable"] = time.monotonic() - start
    return CycleResult("stock", mode, host)


async def cryptlockd_cycle(g: Guest, mode: str, cycle: int) -> CycleResult:
    await armed_ready(g)
    since = await boottime(g)
    notices = g.console_count(PROMPT_NOTICE)
    host: dict[str, float] = {}
    start = await _sleep(g, host)
    usable = await _wake(g, host, start, cycle)
    await g.wait_console(PROMPT_NOTICE, 180, after=notices)
    host["prompt"] = time.monotonic() - start
    await g.type_text(layout.PASSPHRASE)
    host["enter"] = time.monotonic() - start
    await usable
    host["usable"] = time.monotonic() - start
    rec = await last_cycle(g, since)
    assert_complete(rec, shared=mode == "shared")
    return CycleResult("cryptlockd", mode, host, rec)


async def _frame(g: Guest, path: Path) -> np.ndarray:
    """The screen as an array of pixels (PPM: no decoder needed)."""
    await g.qmp("screendump", {"filename": str(path), "format": "ppm"})
    data = path.read_bytes()
    # P6\n<w> <h>\n<max>\n<pixels>
    fields = data.split(b"\n", 3)
    w, h = (int(x) for x in fields[1].split())
    return np.frombuffer(fields[3], dtype=np.uint8)[: w * h * 3].reshape(h * w, 3)


def changed_pixels(a: np.ndarray, b: np.ndarray) -> int:
    if a.shape != b.shape:
        return a.shape[0]
    return int(np.count_nonzero((a != b).any(axis=1)))


async def _prompt_shown(g: Guest, asleep: np.ndarray, workdir: Path, cycle: int) -> float:
    """When the prompt appeared (host monotonic): the screen differs from the one at
    SUSPEND and then stays as it is for PROMPT_STABLE seconds (the prompt waits; what the
    resume prints before it does not), dated at its last change. The first change alone
    was too early: typing then went nowhere."""
    deadline = time.monotonic() + 120
    last, changed_at = await _frame(g, workdir / "now.ppm"), time.monotonic()
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"no prompt on VT {VT} after wake (cycle {cycle})")
        await asyncio.sleep(0.1)
        now = await _frame(g, workdir / "now.ppm")
        if changed_pixels(now, last) > CURSOR_PIXELS:
            last, changed_at = now, time.monotonic()
        elif (
            changed_pixels(now, asleep) >= PROMPT_PIXELS
            and time.monotonic() - changed_at >= PROMPT_STABLE
        ):
            return changed_at


async def debian_cycle(g: Guest, mode: str, cycle: int, workdir: Path) -> CycleResult:
    """The askpass prompt of cryptsetup-suspend shows on VT 8 only (not on the serial
    console), so it is found by polling the screen (QMP screendump, about every 0.2 s) until
    it differs from the screen at SUSPEND; the figure is that coarse."""
    host: dict[str, float] = {}
    start = await _sleep(g, host)
    asleep = await _frame(g, workdir / "asleep.ppm")
    usable = await _wake(g, host, start, cycle)
    host["prompt"] = await _prompt_shown(g, asleep, workdir, cycle) - start
    attempts = 0
    while attempts < 3:
        attempts += 1
        await g.type_text(layout.PASSPHRASE)
        host["enter"] = time.monotonic() - start
        done, _ = await asyncio.wait([usable], timeout=RETYPE_AFTER)
        if done:
            break
        # Typed before askpass flushed its input: the prompt still waits.
    await usable
    host["usable"] = time.monotonic() - start
    host["attempts"] = attempts
    return CycleResult("debian", mode, host)
