"""`make demo`, part 6: close the lid, sleep with the keys wiped, wake, type the passphrase at
the VT, print the cycle's timeline and the wipe verification. Called by tests/vm/demo.py."""

from __future__ import annotations

from collections.abc import Callable

from tests.vm import layout
from tests.vm.guest import Guest, poll
from tests.vm.test_cycle import LID, armed_ready, last_cycle, run_cycle


def _print(text: str) -> None:
    print(f"    {text}", flush=True)


async def show(guest: Guest, say: Callable[[str], None]) -> None:
    g = guest
    say(
        "Waiting until cryptlockd reports Protected and its helper's RAM filesystem is built "
        "(the helper runs from RAM, so it never touches the disks it locks)."
    )
    await armed_ready(g)
    say("Preparing a lid switch: a uinput device in the guest that logind watches.")
    await g.run(
        "modprobe uinput && mkdir -p /run/systemd/logind.conf.d && printf '[Login]\\n"
        "HoldoffTimeoutSec=0\\nHandleLidSwitch=suspend\\n"
        "HandleLidSwitchExternalPower=suspend\\nHandleLidSwitchDocked=suspend\\n' "
        "> /run/systemd/logind.conf.d/demo.conf && systemctl kill -s HUP systemd-logind"
    )
    await g.write_file("/root/lid.py", LID.encode())
    await g.spawn("python3 /root/lid.py", "/root/lid.out")
    await poll(
        g,
        "journalctl -b -u systemd-logind --no-pager",
        lambda o: "cryptlockd test lid" in o,
        60,
        "logind watches the lid switch",
    )
    say(
        "Closing the lid. cryptlockd arms its helper; the helper switches to its own VT, "
        "freezes every other cgroup, syncs, suspends both LUKS devices (the kernel wipes "
        "their keys), checks the wipe, and writes 'mem' to /sys/power/state. The host sees "
        "QEMU's SUSPEND event; then it wakes the guest, waits for the prompt and types the "
        "passphrase with send-key."
    )
    to_suspend = await run_cycle(g, [layout.PASSPHRASE], "touch /run/lid-go")
    say(
        f"Lid closed -> guest asleep in {to_suspend:.1f} s. Woken, passphrase typed, disks back. "
        f"The VT at the prompt was saved as {g.workdir / 'prompt.png'}."
    )
    rec = await last_cycle(g)
    say(
        f"The cycle record (LastCycle): result {rec['result']}"
        + (f", reason: {rec['reason']}" if rec.get("reason") else "")
        + f"; delay lock released {rec['arm_seconds']} s after PrepareForSleep."
    )
    say("Timeline (ms since the daemon began to arm; the time asleep and at the prompt counts):")
    for step, ms in rec["timeline_ms"].items():
        _print(f"{ms:10.1f}  {step}")
    say("Wipe verification, per device (read by the helper after crypt_suspend, before the sleep):")
    for dm, facts in rec["verification"].items():
        _print(f"{dm}: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    await g.run("sync && dd if=/dev/urandom of=/data/demo bs=4k count=16 oflag=direct status=none")
    say("A direct-I/O write to /data after resume succeeded: the disks are usable again.")
