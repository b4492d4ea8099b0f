"""The kernel-facing steps of the cycle: cycle.Ops as the armed helper performs them.

cycle.run_cycle decides the order and the error paths; each step here is one thing done to
the system (cgroups, sync, sysfs knobs, libcryptsetup, the VT). The files under /state tell
the recovery (recover.py) and the daemon what to undo should the helper die mid-cycle
(SPEC 2.7, 2.8): each is written before the step it undoes.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import stat
import threading
import time

from cryptlockd.helper import (
    cgroups,
    dm_ioctl,
    hardening,
    mappings,
    page_cache,
    power,
    prompt_screen,
    protocol,
    token,
    verify,
)
from cryptlockd.helper.cycle import late_plan
from cryptlockd.helper.inputs import Inputs
from cryptlockd.helper.kdf import ChildAttempt, ChildFailed, KdfBudget
from cryptlockd.helper.libcryptsetup import Device
from cryptlockd.helper.resume import LINE, REDRAW
from cryptlockd.helper.vt import VtError, kernel_messages_off
from cryptlockd.helper.wake_watch import WakeWatch

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from cryptlockd.helper.cycle import DevicePlan, Ops
    from cryptlockd.helper.prompt_screen import PromptInfo
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


def write_state(path: str, data: dict[str, object]) -> None:
    # Whole or not at all: the recovery must never read half a state.
    tmp = path + ".new"
    with open(tmp, "w") as f:
        json.dump(data, f)
    os.replace(tmp, path)


def read_fault_hook(path: str = power.HOST_ROOT + protocol.FAULT_HOOK) -> str:
    """The test hook's step, or "" (read when armed, then removed: it serves one cycle).
    Only a regular file owned by root that nobody else may write counts."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:
        return ""
    try:
        st = os.fstat(fd)
        step = os.read(fd, 64).decode(errors="replace").strip()
    finally:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(path)
    trusted = stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022
    return step if trusted and step in protocol.FAULTS else ""


class SystemOps:
    def __init__(self, helper: Helper) -> None:
        self.h = helper
        # The devices that may be suspended: each is noted before its crypt_suspend.
        self.suspending: list[str] = []
        self._hung_up = False
        # The current wake's watch and input devices (prompt, woke).
        self.watch: WakeWatch | None = None
        self.inputs: Inputs | None = None

    def _fault(self, step: str) -> None:
        """The test hook (FAULT_HOOK): die for real at `step`, as a crash would."""
        if self.h.fault == step:
            # On the console, so the test on the host knows when: nothing else can say so.
            notice_console(f"cryptlockd: test hook: SIGKILL at {step}")
            os.kill(os.getpid(), signal.SIGKILL)

    def save_cycle_state(self) -> None:
        t = self.h.terminal
        write_state(
            protocol.CYCLE_STATE_IN_RAMFS,
            {
                "plan": [p.as_dict() for p in self.h.plan],
                "suspended": list(self.suspending),
                "vt": t.number,
                "vt_original": t.original,
                "backoff_initial": self.h.backoff_initial,
                "backoff_max": self.h.backoff_max,
                "poweroff_after": self.h.poweroff_after,
                "poweroff_locked_after": self.h.poweroff_locked_after,
                "unanswered_wake_after": self.h.unanswered_wake_after,
                "sleeps": self.h.sleeps,
                "keyslots": {
                    n: d.last_keyslot for n, d in self.h.devices.items() if d.last_keyslot >= 0
                },
            },
        )

    def freeze(self, frozen: list[str]) -> None:
        plan = freeze_plan()
        # Written before freezing, so a crash mid-cycle leaves the recovery (and the
        # daemon) a list to thaw, and the recovery what it needs to prompt.
        self.save_cycle_state()
        with open(protocol.FROZEN_STATE_IN_RAMFS, "w") as f:
            f.write("\n".join(plan) + "\n")
        cgroups.freeze(cgroups.CGROUP_ROOT, plan, self.h.freeze_timeout, frozen)
        self._fault("after-freeze")

    def thaw(self, frozen: list[str]) -> list[str]:
        errors = cgroups.thaw(cgroups.CGROUP_ROOT, frozen)
        if not errors:
            # wind_down thaws only once no essential device is suspended: the cycle is over.
            for path in (protocol.FROZEN_STATE_IN_RAMFS, protocol.CYCLE_STATE_IN_RAMFS):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(path)
        return errors

    def sync(self) -> None:
        power.sync(self.h.sync_timeout, self.h.sync_worker)

    def wait_vt(self) -> None:
        self.h.wait_vt()

    def wait_watchdogs(self) -> None:
        self.h.wait_watchdogs()

    def syncfs(self) -> list[str]:
        try:
            return power.syncfs_block_mounts(self.h.syncfs_timeout, self.h.sync_worker)
        finally:
            self.h.sync_worker.stop()  # the cycle's last job for it

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

    def expedite_rcu(self) -> str | None:
        value = power.get_rcu_expedited()
        if value != "0":
            return None  # expedited already, or no such knob
        # For the recovery and the daemon's repair, should we die before restoring it.
        with open(protocol.RCU_STATE_IN_RAMFS, "w") as f:
            f.write(value + "\n")
        power.set_rcu_expedited("1")
        return value

    def restore_rcu(self, value: str) -> None:
        power.set_rcu_expedited(value)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(protocol.RCU_STATE_IN_RAMFS)

    def suspend(self, device: str) -> None:
        self.suspending.append(device)
        self.save_cycle_state()
        self.h.devices[device].suspend()
        if len(self.suspending) == 1:
            self._fault("after-first-suspend")

    def verify(self, device: str) -> dict[str, str]:
        return verify.verify_device(device)

    def enter_sleep(self) -> None:
        if self.watch is not None:  # again, from the prompt (resume.Resumer.sleep_once_more)
            self.h.terminal.write("\nGoing back to sleep; the disks stay locked.\n")
        self.h.record.step("sleep_write")
        power.enter_sleep(self.h.sleep_state, self.h.mem_sleep)
        self.woke()

    def drop_page_cache(self) -> int:
        return page_cache.drop_page_cache()

    def reserve_ready(self) -> None:
        self.h.reserve_ready()

    def release_reserve(self) -> None:
        # The KDFs of devices resumed at once may now take what it held (kdf.py).
        self.h.kdf_budget = KdfBudget(self.h.reserve.kib)
        self.h.reserve.release()

    def lock_on_fault(self) -> None:
        hardening.lock_on_fault()

    def refresh_header(self, device: str) -> None:
        self.h.devices[device].reload()

    def late_devices(self, planned: list[DevicePlan]) -> list[DevicePlan]:
        """LUKS mappings that were not there when armed, opened to be suspended (and in
        the plan the recovery reads); one that cannot be (a detached header) is left out
        and reported unprotected. Frozen by now: nothing goes to the journal."""
        assert self.h.library is not None
        late = []
        for name in sorted(set(mappings.luks_mappings()) - self.h.armed_mappings):
            try:
                self.h.devices[name] = Device(self.h.library, name)
            except Exception as e:
                self.h.record.devices.append(name)
                self.h.unprotected(name, f"{name} (opened after arming): {e}", journal=False)
                continue
            late.append(late_plan(name, planned))
        self.h.plan = late + self.h.plan
        return late

    def present(self, device: str) -> bool:
        return mappings.backing_present(device)

    def deactivate(self, device: str) -> None:
        dm_ioctl.close_with_error_target(device)
        if device in mappings.suspended_mappings():
            raise RuntimeError("still suspended after the forced deactivation")

    def _watch(self) -> WakeWatch:
        """This wake's watch (wake_watch.py) and input devices: from the wake on, or from
        the first prompt of a recovery or a cycle without sleep."""
        if self.watch is None:
            self.woke()
        assert self.watch is not None
        return self.watch

    def woke(self) -> None:
        if self.inputs is not None:
            self.inputs.close()
        self.inputs = None
        self.watch = WakeWatch(
            time.monotonic(),
            give_up_after=self.h.poweroff_locked_after,
            unanswered_after=self.h.unanswered_wake_after,
        )

    def prompt(self, secret: SecretBuffer, info: PromptInfo) -> str:
        t = self.h.terminal
        watch = self._watch()
        watch.sleep_again = info.sleep_again
        if self.inputs is None:
            self.inputs = Inputs()
        inputs = self.inputs
        # The lid as the prompt appears: closed within its first second, it still counts
        # as closed again, not as shut since the wake.
        watch.check(time.monotonic(), inputs.lid_closed(), False)
        skip = f"; {prompt_screen.SKIP_KEY_NAME} skips them" if info.skippable else ""
        mounts = {p.name: p.mounts for p in self.h.plan}
        word = token.prompt_word(self.h.devices, info.asking)

        def ready() -> None:
            t.write(prompt_screen.render(info, os.uname().nodename, mounts, word))
            notice_console(
                f"cryptlockd: disks locked; passphrase prompt on VT {t.number} for "
                f"{', '.join(info.asking)} (attempt {info.failures + 1}){skip}"
            )
            if not self._hung_up and self.h.fault == "hangup-at-prompt":
                self._hung_up = True
                notice_console(f"cryptlockd: test hook: hanging up VT {t.number}")
                t.hang_up()
            self._fault("at-prompt")

        why = ""

        def stop() -> bool:
            nonlocal why
            # A disk unplugged while asleep may go only now, as the kernel handles the
            # hotplug after the wake: the prompt is drawn again without it.
            if any(not mappings.backing_present(d) for d in info.vanishing):
                why = REDRAW
            else:
                why = watch.check(time.monotonic(), inputs.lid_closed(), inputs.touched())
            return bool(why)

        with kernel_messages_off():
            got = t.read_secret(secret, stop, ready)
        if got is None:
            t.write("\n")
            return why
        if not got:
            # A hung-up VT reads end of file for good: the loop opens it again.
            raise VtError(f"end of file on VT {t.number}")
        watch.touched = True
        if prompt_screen.line_kind(secret) == prompt_screen.PASSPHRASE:
            t.write("Unlocking...\n")
        return LINE

    def resume_passphrase(self, device: str, secret: SecretBuffer) -> bool:
        record = self.h.record
        if (
            device in record.kdf_children
            and device in mappings.luks_mappings()
            and device not in mappings.suspended_mappings()
        ):
            # Back already: its child resumed it, then died before it could say so, and
            # this is the attempt again (kdf.attempt_all). Another resume would fail, and
            # the device would ask for ever.
            return True
        return self.h.devices[device].resume_by_passphrase(
            ctypes.addressof(secret.buf),
            secret.length,
            self.h.kdf_budget,
            # In the calling thread (kdf.attempt_all): distinct names, so the timeline's
            # dict sees one writer per key.
            lambda: record.step(f"derived:{device}"),
        )

    def passphrase_children(
        self, names: list[str], secret: SecretBuffer
    ) -> dict[str, ChildAttempt]:
        """For devices that try the passphrase at once: all but the first each in a child
        of its own (kdf.py), started now, when their KDFs fit in the reserve together
        and no other thread runs (a child forked beside one could inherit a lock it
        holds). Else, or where a fork fails, those devices get a thread instead."""
        devices = [self.h.devices[name] for name in names]
        if (
            len(devices) < 2
            or threading.active_count() > 1
            or sum(d.pbkdf_memory_kib() for d in devices) > self.h.kdf_budget.kib
        ):
            return {}
        record, children = self.h.record, {}
        for name, dev in zip(names[1:], devices[1:], strict=True):

            def derived(at: float, name: str = name) -> None:
                record.step(f"derived:{name}", at=at)

            try:
                children[name] = dev.resume_in_child(
                    ctypes.addressof(secret.buf), secret.length, derived
                )
                if name not in record.kdf_children:
                    record.kdf_children.append(name)
            except ChildFailed as e:
                record.problems.append(f"{name}: no child for its KDF, a thread instead: {e}")
        return children

    def resume_pin(self, device: str, secret: SecretBuffer) -> bool | None:
        return token.resume_by_pin(
            self.h.devices[device], ctypes.addressof(secret.buf), secret.length
        )

    def resume_keyfile(self, device: str, keyfile: str, size: int, offset: int) -> None:
        # The keyfile lives on the real root, which is PID 1's root; it is back by now.
        self.h.devices[device].resume_by_keyfile(power.HOST_ROOT + keyfile, size, offset)

    def backoff(self, failures: int) -> None:
        # Sleep first: should the flush fail (EIO on a hung-up VT), the wait was kept.
        delay = min(self.h.backoff_initial * 2 ** (failures - 1), self.h.backoff_max)
        time.sleep(delay)
        self.h.terminal.flush_input()

    def reopen_terminal(self) -> None:
        self.h.terminal.reopen()

    def power_off(self, why: str) -> None:
        self.h.terminal.write(f"\n{why}\n")
        notice_console(f"cryptlockd: {why}")
        power.power_off()


if TYPE_CHECKING:

    def _implements_ops(ops: SystemOps) -> Ops:
        # mypy checks SystemOps against the Protocol here, not only where run_cycle is called.
        return ops
