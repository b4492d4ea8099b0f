"""The resume prompt (issue 14, acceptance 2 and 5): a screen a person understands, and a
prompt that gives up safely.

Mid-cycle everything in the guest but the helper is frozen, the test agent included, so
the host drives each case through QMP: keys (send-key), wake-ups, the
SUSPEND/WAKEUP/SHUTDOWN events and a RAM dump. The lid is a uinput switch driven by a
small process (LID below) that the test moves into the helper unit's cgroup, the one
cgroup the helper never freezes: a real lid is hardware and keeps working whatever is
frozen, and this process stands in for it. It closes the lid when right Shift is pressed
alone (nothing reaches the VT) and sets the RTC alarm to wake the guest 20 s later (an RTC
wake with the lid shut); right Ctrl opens it again.

Kernel-independent (the helper's own logic on the VT and the input devices; the sleep
write and the RTC are what every other cycle test proves on both releases): bookworm only.
"""

from __future__ import annotations

import shutil
import time

import pytest

from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.sleepcycle import (
    PROMPT_NOTICE,
    armed_ready,
    boottime,
    last_cycle,
    suspend,
)
from tests.vm.test_wipe import scan, volume_keys

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio,
    pytest.mark.timeout(900),
    pytest.mark.vm_suites("bookworm"),
]

UNANSWERED_SEC = 10
GIVE_UP_SEC = 15
RTC_AFTER_SEC = 20
HELPER_CGROUP = "/sys/fs/cgroup/cryptlockd.slice/cryptlockd-helper.service"

# The lid: mlockall()ed, so that nothing it runs faults a page in from the suspended root,
# and logging to /run (tmpfs) only.
LID = f"""
import ctypes, fcntl, os, select, struct
ctypes.CDLL(None).mlockall(3)
UI_SET_EVBIT, UI_SET_SWBIT, UI_DEV_CREATE = 0x40045564, 0x4004556D, 0x5501
EV_SYN, EV_KEY, EV_SW, SW_LID = 0, 1, 5, 0
KEY_ENTER, KEY_A, KEY_RIGHTSHIFT, KEY_RIGHTCTRL = 28, 30, 54, 97
fd = os.open("/dev/uinput", os.O_WRONLY | os.O_NONBLOCK)
fcntl.ioctl(fd, UI_SET_EVBIT, EV_SW)
fcntl.ioctl(fd, UI_SET_SWBIT, SW_LID)
os.write(fd, struct.pack("80sHHHHi", b"cryptlockd test lid", 6, 1, 1, 1, 0) + bytes(4 * 64 * 4))
fcntl.ioctl(fd, UI_DEV_CREATE)

def has_bit(text, bit):
    words = text.split()
    i = len(words) - 1 - bit // 64
    return i >= 0 and bool(int(words[i], 16) >> (bit % 64) & 1)

# The keyboards: a modifier pressed alone puts nothing on the VT.
keyboards = []
for name in sorted(os.listdir("/sys/class/input")):
    if name.startswith("event"):
        with open(f"/sys/class/input/{{name}}/device/capabilities/key") as f:
            caps = f.read()
        if has_bit(caps, KEY_ENTER) and has_bit(caps, KEY_A):
            keyboards.append(os.open(f"/dev/input/{{name}}", os.O_RDONLY))
console = os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY)
print("created, keyboards", len(keyboards), flush=True)

def emit(value):
    os.write(fd, struct.pack("qqHHi", 0, 0, EV_SW, SW_LID, value))
    os.write(fd, struct.pack("qqHHi", 0, 0, EV_SYN, 0, 0))
    os.write(console, b"\\r\\ntest lid: " + (b"closed" if value else b"opened") + b"\\r\\n")

while True:
    for kbd in select.select(keyboards, [], [])[0]:
        _, _, kind, code, value = struct.unpack("qqHHi", os.read(kbd, 24))
        if kind == EV_KEY and code == KEY_RIGHTSHIFT and value == 1:
            with open("/sys/class/rtc/rtc0/wakealarm", "w") as f:
                f.write("0")
            with open("/sys/class/rtc/rtc0/wakealarm", "w") as f:
                f.write("+{RTC_AFTER_SEC}")
            emit(1)
        elif kind == EV_KEY and code == KEY_RIGHTCTRL and value == 1:
            emit(0)
"""


async def press(g: Guest, key: str) -> None:
    """A modifier alone: the lid hears it, the VT gets nothing."""
    await g.send_keys(key)


async def configure(g: Guest, settings: str) -> None:
    await g.run(
        "mkdir -p /etc/cryptlockd/cryptlockd.conf.d && printf '[prompt]\\n"
        f"{settings}\\n' > /etc/cryptlockd/cryptlockd.conf.d/50-test.conf && cryptlockctl reload"
    )


async def start_lid(g: Guest) -> None:
    """The lid above, in the helper's cgroup, and logind told to leave it alone: it reads
    the lid's events after the thaw, and must not suspend on them."""
    await g.run(
        "modprobe uinput; mkdir -p /run/systemd/logind.conf.d && "
        "printf '[Login]\\nHandleLidSwitch=ignore\\nHandleLidSwitchExternalPower=ignore\\n"
        "HandleLidSwitchDocked=ignore\\n' > /run/systemd/logind.conf.d/test-lid.conf && "
        "systemctl kill -s HUP systemd-logind"
    )
    await g.write_file("/root/lid.py", LID.encode())
    await g.spawn("python3 /root/lid.py", "/run/lid.log")
    log = (
        await g.wait_for_command(
            "cat /run/lid.log", 60, "the lid switch", ok=lambda o: "created" in o
        )
    ).stdout
    assert "keyboards 0" not in log, f"no keyboard in the guest to drive the lid with: {log}"
    # The interpreter and the shell that started it: each process moves on its own. pgrep's
    # pattern is one its own shell's command line does not match.
    find = "pgrep -f '^python3 /root/[l]id.py|^sh -c python3 /root/[l]id.py'"
    await g.run(f"for p in $({find}); do echo $p > {HELPER_CGROUP}/cgroup.procs; done")
    procs = (await g.run(f"cat {HELPER_CGROUP}/cgroup.procs")).stdout.split()
    lid = (await g.run(find)).stdout.split()
    assert lid and set(lid) <= set(procs), (lid, procs)


async def wait_prompt(g: Guest, notices: int, what: str) -> None:
    await g.wait_console(PROMPT_NOTICE, 180, after=notices)
    print(f"\n{what}: prompt {notices + 1}")


async def test_esc_lid_and_an_unanswered_wake_sleep_again_and_the_screen(
    installed_guest: Guest,
) -> None:
    g = installed_guest
    await armed_ready(g)
    await configure(g, f"unanswered_wake_sleep_sec = {UNANSWERED_SEC}")
    await start_lid(g)
    keys = await volume_keys(g)
    hostname = (await g.run("hostname")).stdout.strip()
    since = await boottime(g)
    notices = g.console_count(PROMPT_NOTICE)
    await suspend(g, "systemctl suspend")

    # Esc: back to sleep at once, no key in RAM while asleep again.
    mark = g.event_mark()
    await g.wakeup()
    await wait_prompt(g, notices, "first wake")
    await g.screendump("first-prompt")
    await g.send_keys("esc")
    await g.wait_event("SUSPEND", 60, since=mark)
    assert await g.status() == "suspended"
    counts = scan(await g.dump_memory("asleep-again"), keys)
    assert not any(counts.values()), f"a key in RAM while asleep again: {counts}"

    # The next wake prompts again; the lid closed at the prompt: back to sleep.
    mark = g.event_mark()
    await g.wakeup()
    await wait_prompt(g, notices + 1, "after Esc")
    lids = g.console_count("test lid: closed")
    await press(g, "shift_r")
    await g.wait_console("test lid: closed", 30, after=lids)
    lid_sleep = await g.wait_event("SUSPEND", 60, since=mark)

    # The RTC wakes it with the lid still shut; nobody answers: back to sleep by itself.
    mark = g.event_mark()
    woke = await g.wait_event("WAKEUP", RTC_AFTER_SEC + 60, since=mark)
    await wait_prompt(g, notices + 2, "RTC wake")
    again = await g.wait_event("SUSPEND", UNANSWERED_SEC + 60, since=mark)
    print(
        f"RTC wake {woke.monotonic - lid_sleep.monotonic:.1f} s after the lid sleep, "
        f"asleep again {again.monotonic - woke.monotonic:.1f} s later"
    )
    assert again.monotonic - woke.monotonic >= UNANSWERED_SEC

    # A wake, the lid opened: one wrong passphrase, then the right one.
    mark = g.event_mark()
    await g.wakeup()
    await g.wait_event("WAKEUP", 60, since=mark)
    # Only once the prompt is up: a key pressed while the kernel resumes may be lost.
    await wait_prompt(g, notices + 3, "woken by the host")
    opens = g.console_count("test lid: opened")
    await press(g, "ctrl_r")
    await g.wait_console("test lid: opened", 30, after=opens)
    await g.type_text("not the passphrase")
    await wait_prompt(g, notices + 4, "after a wrong passphrase")
    shot = await g.screendump("prompt-screen")
    # Kept whatever the outcome: acceptance 5's picture.
    shutil.copy(shot, g.workdir.parent / "prompt-screen.png")
    await g.type_text(layout.PASSPHRASE)
    t0 = time.monotonic()
    await g.wait_agent(240, "agent after the resume")
    print(f"resumed {time.monotonic() - t0:.1f} s after the passphrase")

    rec = await last_cycle(g, since)
    assert rec["slept_again"] == ["esc", "lid", "unanswered"], rec
    assert rec["success"] is True and rec["wrong_passphrases"] == 1, rec
    assert set(rec["resumed"]) == {layout.ROOT_DM_NAME, layout.DATA_DM_NAME}
    t = rec["timeline_ms"]
    assert t["sleep_again:esc"] < t["sleep_again:lid"] < t["sleep_again:unanswered"], t
    assert "woke#4" in t and "prompt#5" in t, t

    # The prompt screen, as the VT's text (vcs): cleared (the first row is ours, no kernel
    # message on it), the machine, each disk by mount point and dm name, the keys, the count.
    vt = int(rec["vt"])
    cols = int((await g.run(f"stty -F /dev/tty{vt} size")).stdout.split()[1])
    raw = (await g.run(f"cat /dev/vcs{vt}")).stdout
    rows = [raw[i : i + cols].rstrip() for i in range(0, len(raw), cols)]
    screen = "\n".join(r for r in rows if r)
    print(f"the prompt screen on VT {vt}:\n{screen}")
    assert rows[0].startswith(f"{hostname} is locked"), screen
    disk_rows = {
        r.split()[1]: r.split()[0].rstrip(",")
        for r in rows
        if r.split()[1:2] in (["root"], ["data"])
    }
    assert disk_rows == {layout.ROOT_DM_NAME: "/", layout.DATA_DM_NAME: "/data"}, screen
    for text in ("Enter", "Esc", "back to sleep", "1 failed attempt", "Passphrase for root:"):
        assert text in screen, f"{text!r} not on the prompt screen:\n{screen}"
    assert "PM:" not in screen and "ACPI" not in screen, screen


async def test_give_up_powers_off(installed_guest: Guest) -> None:
    g = installed_guest
    await armed_ready(g)
    await configure(g, f"poweroff_after_wake_sec = {GIVE_UP_SEC}")
    notices = g.console_count(PROMPT_NOTICE)
    await suspend(g, "systemctl suspend")
    mark = g.event_mark()
    await g.wakeup()
    woke = await g.wait_event("WAKEUP", 60, since=mark)
    await wait_prompt(g, notices, "wake")
    # Nobody types: powered off, GIVE_UP_SEC after the wake.
    down = await g.wait_event("SHUTDOWN", GIVE_UP_SEC + 90, since=mark)
    print(f"powered off {down.monotonic - woke.monotonic:.1f} s after the wake: {down.data}")
    assert down.data.get("guest") is True, down.data
    assert down.monotonic - woke.monotonic >= GIVE_UP_SEC
    assert "cryptlockd: Nobody unlocked the disks in time" in g.console_text()
