"""Driving a protected sleep cycle from the host: the steps the cycle and wipe tests, the demo
and the bench share.

Nothing in the guest answers while the cycle runs (the helper freezes it on purpose), so the
host follows the cycle through QMP events (SUSPEND, WAKEUP) and the serial console (the
helper's prompt notice), and reads the cycle record (LastCycle) once the guest is back.
"""

from __future__ import annotations

import json
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tests.vm import layout
from tests.vm.guest import Guest, unwrap

MANAGER = "org.cryptlockd1 /org/cryptlockd1 org.cryptlockd1.Manager"
PROMPT_NOTICE = "cryptlockd: disks locked; passphrase prompt on VT"
# The helper's RAM filesystem is complete once its manifest is there (written last).
MANIFEST = "/run/cryptlockd/ramfs/manifest.json"
# The guest's CLOCK_BOOTTIME in seconds (it counts the time asleep), as a shell command.
UPTIME = "cut -d' ' -f1 /proc/uptime"
# The order every complete protected cycle's timeline follows (data is suspended first: it
# sits on no other device, root holds its keyfile).
TIMELINE = [
    "arm_requested",
    "armed",
    "begin",
    "sync_start",
    "synced",
    "vt_switched",
    "watchdogs_off",
    "freeze_start",
    "frozen",
    "filesystems_synced",
    "sync_on_suspend_off",
    "rcu_expedited",
    f"suspended:{layout.DATA_DM_NAME}",
    "rcu_restored",
    "verified",
    "sleep_write",
    "woke",
    "prompt",
    "passphrase_entered",
    f"resumed:{layout.ROOT_DM_NAME}",
    f"resumed:{layout.DATA_DM_NAME}",
    "thawed",
    "vt_switched_back",
    "finished",
]


@dataclass(frozen=True)
class Cycle:
    to_suspend: float  # seconds from the trigger to QMP SUSPEND
    since: float  # the guest's boottime just before the trigger: last_cycle(since=)


async def armed_ready(guest: Guest) -> None:
    """The daemon reports Protected and its helper's RAM filesystem is built (at start)."""
    await guest.wait_for_command(
        f"busctl get-property {MANAGER} Protected",
        240,
        "cryptlockd reports Protected",
        ok=lambda o: "true" in o,
    )
    await guest.wait_for_command(f"test -s {MANIFEST}", 180, "the helper's RAM filesystem")


async def boottime(guest: Guest) -> float:
    """The guest's CLOCK_BOOTTIME in seconds, a second early (cycle records use it)."""
    return float((await guest.run(UPTIME)).stdout) - 1.0


async def last_cycle(guest: Guest, since: float | None = None) -> dict[str, Any]:
    """LastCycle, unwrapped. With `since` (boottime()), it waits until LastCycle is the record
    of a cycle that started after that moment."""

    def fresh(out: str) -> bool:
        return since is None or unwrap(json.loads(out)["data"])["started_boottime"] > since

    result = await guest.wait_for_command(
        f"busctl --json=short get-property {MANAGER} LastCycle",
        120,
        "LastCycle of this cycle",
        ok=fresh,
    )
    record: dict[str, Any] = unwrap(result.json()["data"])
    return record


def png_has_content(path: Path) -> bool:
    """True unless the screen is one flat colour (decodes the PNG's IDAT stream)."""
    data = path.read_bytes()
    pos, idat = 8, b""
    while pos < len(data):
        length = int.from_bytes(data[pos : pos + 4], "big")
        kind = data[pos + 4 : pos + 8]
        if kind == b"IDAT":
            idat += data[pos + 8 : pos + 8 + length]
        pos += 12 + length
    raw = zlib.decompress(idat)
    return len(set(raw[1 : 4096 * 16])) > 2


async def suspend(guest: Guest, trigger: str, timeout: float = 90.0) -> float:
    """Starts `trigger` in the guest and waits for QMP SUSPEND; returns the seconds between."""
    mark = guest.event_mark()
    start = time.monotonic()
    await guest.spawn(trigger, "/root/trigger.log")
    event = await guest.wait_event("SUSPEND", timeout, since=mark)
    return event.monotonic - start


async def unlock(guest: Guest, passphrases: Sequence[str], notices: int) -> None:
    """Types each passphrase once the helper has announced its prompt on the console (the
    console had shown `notices` announcements before this cycle). The first prompt's VT is
    saved as prompt.png and must not be blank."""
    for i, phrase in enumerate(passphrases):
        await guest.wait_console(PROMPT_NOTICE, 180, after=notices + i)
        if i == 0:
            shot = await guest.screendump("prompt")
            assert png_has_content(shot), "the VT shows nothing at the prompt"
        await guest.type_text(phrase)


async def wake(
    guest: Guest, passphrases: Sequence[str] = (), *, notices: int = 0, what: str = "resume"
) -> None:
    """Wakes the sleeping guest, answers the prompts with `passphrases` (none after a stock
    sleep) and waits until the agent answers again."""
    mark = guest.event_mark()
    await guest.wakeup()
    await guest.wait_event("WAKEUP", 60, since=mark)
    await unlock(guest, passphrases, notices)
    await guest.wait_agent(240, f"agent after {what}")


async def devices_key_source(guest: Guest, name: str, source: str, what: str) -> None:
    """Waits until `cryptlockctl devices` says that device `name` takes its key from
    `source` (after a Reload)."""
    await guest.wait_for_command(
        "cryptlockctl devices --json",
        60,
        what,
        ok=lambda o: {d["name"]: d["key_source"] for d in json.loads(o)}.get(name) == source,
    )


async def watch_signals(guest: Guest) -> None:
    """From now on, CycleFinished signals go to /root/cycle-signal.log (see signals())."""
    await guest.run(
        "rm -f /root/cycle-signal.log; setsid busctl monitor --json=short "
        "--match type=signal,interface=org.cryptlockd1.Manager,"
        "member=CycleFinished > /root/cycle-signal.log 2>&1 < /dev/null &"
    )


async def signals(guest: Guest, count: int) -> list[tuple[bool, dict[str, Any]]]:
    """The first `count` CycleFinished signals since watch_signals(), as (success, the
    record as busctl shows it), once there are that many."""

    def parse(out: str) -> list[tuple[bool, dict[str, Any]]]:
        msgs = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
        return [(m["payload"]["data"][0], m["payload"]["data"][1]) for m in msgs]

    out = await guest.wait_for_command(
        "cat /root/cycle-signal.log",
        60,
        f"{count} CycleFinished signal(s)",
        ok=lambda o: len(parse(o)) >= count,
    )
    return parse(out.stdout)[:count]


async def run_cycle(guest: Guest, passphrases: Sequence[str], trigger: str) -> Cycle:
    """Triggers a suspend, waits for SUSPEND, wakes the guest and types each passphrase at
    the prompt. CycleFinished signals are recorded in /root/cycle-signal.log."""
    await watch_signals(guest)
    since = await boottime(guest)
    notices = guest.console_count(PROMPT_NOTICE)
    to_suspend = await suspend(guest, trigger)
    await wake(guest, passphrases, notices=notices)
    return Cycle(to_suspend, since)


def assert_complete(rec: dict[str, Any], shared: bool = False) -> dict[str, float]:
    """A successful cycle: both devices suspended, verified wiped and resumed, every step of
    TIMELINE recorded in order. Returns the timeline. `shared`: both devices take the
    passphrase, so their KDFs run at once and either may be back first."""
    assert rec["success"] is True, rec
    assert set(rec["suspended"]) == {layout.ROOT_DM_NAME, layout.DATA_DM_NAME}
    assert set(rec["resumed"]) == set(rec["suspended"])
    # The headers loaded while idle were read again after wake, before any resume.
    assert not [p for p in rec["problems"] if "header" in p], rec["problems"]
    for dm in rec["suspended"]:
        assert rec["verification"][dm]["dm_table_key"] == "zeroed", rec["verification"]
        assert rec["verification"][dm]["dm_suspended"] == "yes"
    timeline: dict[str, float] = rec["timeline_ms"]
    missing = [s for s in TIMELINE if s not in timeline]
    assert not missing, f"timeline lacks {missing}: {timeline}"
    order = TIMELINE
    if shared:
        first = min(RESUMED, key=lambda s: timeline[s])
        order = [s for s in TIMELINE if s not in RESUMED or s == first]
        order.insert(order.index(first) + 1, next(s for s in RESUMED if s != first))
    times = [timeline[s] for s in order]
    assert times == sorted(times), f"steps out of order: {timeline}"
    return timeline


RESUMED = (f"resumed:{layout.ROOT_DM_NAME}", f"resumed:{layout.DATA_DM_NAME}")


# A lid switch: a uinput device that logind watches. It closes the lid when the trigger
# (LID_TRIGGER) writes to the fifo /run/lid-go, and opens it again as soon as logind has
# logged the close: by then logind has decided to suspend, and a lid still shut after resume
# would make it suspend again.
LID = """
import fcntl, os, signal, struct
from systemd import journal
UI_SET_EVBIT, UI_SET_SWBIT, UI_DEV_CREATE = 0x40045564, 0x4004556D, 0x5501
EV_SYN, EV_SW, SW_LID = 0, 5, 0
fd = os.open("/dev/uinput", os.O_WRONLY | os.O_NONBLOCK)
fcntl.ioctl(fd, UI_SET_EVBIT, EV_SW)
fcntl.ioctl(fd, UI_SET_SWBIT, SW_LID)
os.write(fd, struct.pack("80sHHHHi", b"cryptlockd test lid", 6, 1, 1, 1, 0) + bytes(4 * 64 * 4))
os.mkfifo("/run/lid-go")
fcntl.ioctl(fd, UI_DEV_CREATE)

def emit(value):
    os.write(fd, struct.pack("qqHHi", 0, 0, EV_SW, SW_LID, value))
    os.write(fd, struct.pack("qqHHi", 0, 0, EV_SYN, 0, 0))

print("created", flush=True)
with open("/run/lid-go") as go:
    go.read()
logind = journal.Reader()
logind.add_match(_SYSTEMD_UNIT="systemd-logind.service")
logind.seek_tail()
logind.get_previous()
emit(1)
print("closed", flush=True)
while not any(entry.get("MESSAGE") == "Lid closed." for entry in logind):
    logind.wait()
emit(0)
print("opened", flush=True)
signal.pause()
"""
LID_TRIGGER = "echo close > /run/lid-go"


async def start_lid(guest: Guest) -> None:
    """Installs the lid switch (LID) and makes logind suspend on it. logind ignores the lid
    for 30 s after boot by default, and counts the VM's virtual display as an external one
    (docked): shorten the one, override the other."""
    await guest.run(
        "modprobe uinput && mkdir -p /run/systemd/logind.conf.d && printf '[Login]\\n"
        "HoldoffTimeoutSec=0\\nHandleLidSwitch=suspend\\n"
        "HandleLidSwitchExternalPower=suspend\\nHandleLidSwitchDocked=suspend\\n' "
        "> /run/systemd/logind.conf.d/test-lid.conf && systemctl kill -s HUP systemd-logind"
    )
    await start_script(
        guest,
        "lid",
        LID,
        "journalctl -b -u systemd-logind --no-pager",
        "logind watches the lid switch",
        lambda o: "cryptlockd test lid" in o,
    )


# A busy writer on the encrypted root: a numbered, checksummed record, fsynced, every 10 ms.
WRITER = """
import hashlib, os, time
fd = os.open("/root/busy.log", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
i = 0
while True:
    payload = b"%010d" % i * 100
    os.write(fd, payload + hashlib.sha256(payload).hexdigest().encode() + b"\\n")
    os.fsync(fd)
    i += 1
    time.sleep(0.01)
"""
WRITER_PATTERN = "python3 /root/[w]riter.py"  # for pkill -f: must not match pkill's shell


async def start_writer(guest: Guest) -> None:
    """Starts WRITER and waits until it has written a few records."""
    await start_script(
        guest,
        "writer",
        WRITER,
        "wc -l < /root/busy.log",
        "the writer is writing",
        lambda o: int(o.strip() or 0) > 20,
    )


async def start_script(
    guest: Guest, name: str, source: str, ready: str, what: str, ok: Callable[[str], bool]
) -> None:
    """Starts the Python `source` in the background as /root/<name>.py (output in
    /root/<name>.out) and waits until the command `ready` prints what `ok` accepts."""
    await guest.write_file(f"/root/{name}.py", source.encode())
    await guest.spawn(f"python3 /root/{name}.py", f"/root/{name}.out")
    await guest.wait_for_command(ready, 60, what, ok=ok)
