"""`make demo`, part 6: close the lid, sleep with the keys wiped, wake, type the passphrase at
the VT, print the cycle's timeline and the wipe verification. Called by tests/vm/demo.py."""

from __future__ import annotations

from collections.abc import Callable

from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.sleepcycle import LID_TRIGGER, armed_ready, last_cycle, run_cycle, start_lid


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
    await start_lid(g)
    say(
        "Closing the lid. cryptlockd arms its helper; the helper switches to its own VT, "
        "freezes every other cgroup, syncs, suspends both LUKS devices (the kernel wipes "
        "their keys), checks the wipe, and writes 'mem' to /sys/power/state. The host sees "
        "QEMU's SUSPEND event; then it wakes the guest, waits for the prompt and types the "
        "passphrase with send-key."
    )
    cycle = await run_cycle(g, [layout.PASSPHRASE], LID_TRIGGER)
    say(
        f"Lid closed -> guest asleep in {cycle.to_suspend:.1f} s. Woken, passphrase typed, "
        f"disks back. The VT at the prompt was saved as {g.workdir / 'prompt.png'}."
    )
    rec = await last_cycle(g, cycle.since)
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
