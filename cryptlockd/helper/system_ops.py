"""The kernel-facing steps of the cycle: cycle.Ops as the armed helper performs them.

cycle.run_cycle decides the order and the error paths; each step here is one thing done to
the system (cgroups, sync, sysfs knobs, libcryptsetup, the VT). The files under /state tell
the daemon what to undo should the helper die mid-cycle (SPEC 2.7).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import time

from cryptlockd.helper import cgroups, power, protocol, verify

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from cryptlockd.helper.cycle import Ops
    from cryptlockd.helper.secret import SecretBuffer
    from cryptlockd.helper.session import Helper


def freeze_plan() -> list[str]:
    """The cgroups to freeze: all but the helper's own branch (cgroups.plan_freeze)."""
    with open("/proc/self/cgroup") as f:
        own = cgroups.own_cgroup(f.read())
    return cgroups.plan_freeze(cgroups.CGROUP_ROOT, own)


def notice_console(text: str) -> None:
    # A line on the system console (often a serial port on servers) pointing at the VT.
    # Non-blocking: a stalled serial line must not hold up the prompt.
    try:
        fd = os.open("/dev/console", os.O_WRONLY | os.O_NOCTTY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError:
        return
    with contextlib.suppress(OSError):
        os.write(fd, f"\r\n{text}\r\n".encode())
    os.close(fd)


class SystemOps:
    def __init__(self, helper: Helper) -> None:
        self.h = helper

    def freeze(self, frozen: list[str]) -> None:
        plan = freeze_plan()
        # Written before freezing, so a crash mid-cycle leaves the daemon a list to thaw.
        with open(protocol.FROZEN_STATE_IN_RAMFS, "w") as f:
            f.write("\n".join(plan) + "\n")
        cgroups.freeze(cgroups.CGROUP_ROOT, plan, self.h.freeze_timeout, frozen)

    def thaw(self, frozen: list[str]) -> list[str]:
        errors = cgroups.thaw(cgroups.CGROUP_ROOT, frozen)
        if not errors:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(protocol.FROZEN_STATE_IN_RAMFS)
        return errors

    def sync(self) -> list[str]:
        return power.sync_all()

    def get_sync_on_suspend(self) -> str | None:
        value = power.get_sync_on_suspend()
        if value is not None:
            # For the daemon's repair, should we die before restoring it.
            with open(protocol.SYNC_STATE_IN_RAMFS, "w") as f:
                f.write(value + "\n")
        return value

    def set_sync_on_suspend(self, value: str) -> None:
        power.set_sync_on_suspend(value)
        if value != "0":
            with contextlib.suppress(FileNotFoundError):
                os.unlink(protocol.SYNC_STATE_IN_RAMFS)

    def suspend(self, device: str) -> None:
        self.h.devices[device].suspend()

    def verify(self, device: str) -> dict[str, str]:
        return verify.verify_device(device)

    def enter_sleep(self) -> None:
        self.h.record.step("sleep_write")
        power.enter_sleep(self.h.sleep_state, self.h.mem_sleep)

    def release_reserve(self) -> None:
        self.h.reserve.release()

    def refresh_headers(self, devices: list[str]) -> list[str]:
        problems = []
        for name in devices:
            try:
                self.h.devices[name].reload()
            except Exception as e:
                problems.append(f"re-reading the header of {name}: {e}")
        return problems

    def prompt(self, secret: SecretBuffer, devices: list[str], failures: int) -> bool:
        t = self.h.terminal
        notice_console(
            f"cryptlockd: disks locked; passphrase prompt on VT {t.number} (attempt {failures + 1})"
        )
        if failures:
            t.write("Sorry, that passphrase did not unlock the disks.\n")
        t.write(
            f"\ncryptlockd: the disks were locked while the machine slept.\n"
            f"Passphrase for {', '.join(devices)}: "
        )
        ok = t.read_secret(secret)
        if ok:
            t.write("Unlocking...\n")
        else:
            time.sleep(0.2)  # end of file on the VT: do not spin
        return ok

    def resume_passphrase(self, device: str, secret: SecretBuffer) -> bool:
        return self.h.devices[device].resume_by_passphrase(
            ctypes.addressof(secret.buf), secret.length
        )

    def resume_keyfile(self, device: str, keyfile: str, size: int, offset: int) -> None:
        # The keyfile lives on the real root, which is PID 1's root; it is back by now.
        self.h.devices[device].resume_by_keyfile(power.HOST_ROOT + keyfile, size, offset)

    def backoff(self, failures: int) -> None:
        delay = min(self.h.backoff_initial * 2 ** (failures - 1), self.h.backoff_max)
        time.sleep(delay)
        self.h.terminal.flush_input()

    def power_off(self) -> None:
        self.h.terminal.write("Too many wrong passphrases: powering off.\n")
        power.power_off()


if TYPE_CHECKING:

    def _implements_ops(ops: SystemOps) -> Ops:
        # mypy checks SystemOps against the Protocol here, not only where run_cycle is called.
        return ops
