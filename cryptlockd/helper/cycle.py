"""The order of the protected sleep (SPEC 2.4, 2.5), apart from the kernel calls.

Every path out of `run_cycle` leaves the devices resumed (it prompts until they are),
sync_on_suspend restored and the cgroups thawed: the structure is try/finally all the way
down, with one exception (SPEC 2.8): nothing is thawed while a device that holds /, /usr,
/var, swap or a keyfile is still suspended, because a thawed system on a suspended root
hangs for good. Should anything escape the prompt loop (it catches every Exception), the
process ends with those devices suspended and the cgroups frozen, and the recovery
(recover.py, the helper unit's ExecStopPost=) runs `wind_down` again.

The kernel-facing steps come in through an `Ops` object, so the order and the error paths
are unit-tested with a fake.
"""

from __future__ import annotations

from cryptlockd.helper.record import CycleRecord
from cryptlockd.helper.resume import resume_all

# Not typing.TYPE_CHECKING: importing typing (and dataclasses) would grow the RAM
# filesystem and the helper's start-up time; mypy honours any name TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

    from cryptlockd.helper.kdf import ChildAttempt
    from cryptlockd.helper.prompt_screen import PromptInfo
    from cryptlockd.helper.secret import SecretBuffer


class DevicePlan:
    __slots__ = (
        "after",
        "essential",
        "header",
        "key_source",
        "keyfile_offset",
        "keyfile_size",
        "mounts",
        "name",
    )

    def __init__(
        self,
        name: str,
        key_source: str,
        keyfile_size: int = 0,
        keyfile_offset: int = 0,
        essential: bool = True,
        after: list[str] | None = None,
        header: str = "",
        mounts: list[str] | None = None,
    ) -> None:
        self.name = name
        self.key_source = key_source  # "passphrase" or "keyfile:<path>"
        # crypttab's keyfile-size= and keyfile-offset=, in bytes; 0: the whole file.
        self.keyfile_size = keyfile_size
        self.keyfile_offset = keyfile_offset
        # Holds /, /usr, /var or swap, or is needed by a device that does (SPEC 2.8,
        # daemon/device_graph.py): nothing may be thawed while it is suspended, and it
        # cannot be skipped. True unless the daemon knows better.
        self.essential = essential
        # The plan's devices that must be back before this one is resumed: below it, or
        # holding its keyfile or header.
        self.after = list(after or [])
        # crypttab's header=, a path on the real root; "": the header is on the device.
        self.header = header
        # Where its file systems are mounted (through any layers above), for the prompt
        # screen: the disk the way its user knows it.
        self.mounts = list(mounts or [])

    def __repr__(self) -> str:
        return (
            f"DevicePlan({self.name!r}, {self.key_source!r}, {self.keyfile_size}, "
            f"{self.keyfile_offset}, essential={self.essential}, after={self.after!r}, "
            f"header={self.header!r})"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "key_source": self.key_source,
            "keyfile_size": self.keyfile_size,
            "keyfile_offset": self.keyfile_offset,
            "essential": self.essential,
            "after": list(self.after),
            "header": self.header,
            "mounts": list(self.mounts),
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DevicePlan:
        return cls(
            str(d["name"]),
            str(d["key_source"]),
            int(d.get("keyfile_size", 0)),
            int(d.get("keyfile_offset", 0)),
            bool(d.get("essential", True)),
            [str(a) for a in d.get("after", [])],
            str(d.get("header", "")),
            [str(m) for m in d.get("mounts", [])],
        )

    @property
    def keyfile(self) -> str | None:
        return (
            self.key_source[len("keyfile:") :] if self.key_source.startswith("keyfile:") else None
        )


class SleepFailed(Exception):
    pass


class DeadlinePassed(Exception):
    """A step before the sleep (sync, syncfs) did not finish in time: the cycle is
    abandoned (SPEC 2.8)."""


if TYPE_CHECKING:

    class Ops(Protocol):
        def freeze(self, frozen: list[str]) -> None: ...
        def thaw(self, frozen: list[str]) -> list[str]: ...
        def sync(self) -> None: ...
        # The switch to our VT, started at `begin`, done: a display server that is frozen
        # can no longer let go of its VT.
        def wait_vt(self) -> None: ...
        # The daemon's word that PID 1's service watchdogs are off (Helper.wait_watchdogs).
        def wait_watchdogs(self) -> None: ...
        def syncfs(self) -> list[str]: ...
        def get_sync_on_suspend(self) -> str | None: ...
        def set_sync_on_suspend(self, value: str) -> None: ...
        # rcu_expedited on for the suspends (_suspend_all); returns the value to put back,
        # None when nothing was changed.
        def expedite_rcu(self) -> str | None: ...
        def restore_rcu(self, value: str) -> None: ...
        def suspend(self, device: str) -> None: ...
        def verify(self, device: str) -> dict[str, str]: ...
        def enter_sleep(self) -> None: ...
        # Returns the bytes of freed memory it cleared (page_cache.py).
        def drop_page_cache(self) -> int: ...
        # The KDF reserve all in RAM (reserve.py): before the first suspend, after which
        # the dirty pages of a suspended disk could not be written out to make room.
        def reserve_ready(self) -> None: ...
        def release_reserve(self) -> None: ...
        # Before KDFs that run at once: new memory locked as touched, not in mmap()
        # (hardening.lock_on_fault).
        def lock_on_fault(self) -> None: ...
        def refresh_header(self, device: str) -> None: ...
        # resume.LINE: a line is in `secret`; resume.REDRAW: nothing typed (a device in
        # info.vanishing went away meanwhile); or a wake_watch reason (GIVE_UP, LID,
        # UNANSWERED) to stop waiting.
        def prompt(self, secret: SecretBuffer, info: PromptInfo) -> str: ...
        def resume_passphrase(self, device: str, secret: SecretBuffer) -> bool: ...
        # Children already at resume_passphrase for all of `names` but the first, which
        # the caller tries itself (kdf.attempt_all); {} where they cannot be had.
        def passphrase_children(
            self, names: list[str], secret: SecretBuffer
        ) -> dict[str, ChildAttempt]: ...
        # None: no TPM2+PIN token on the device (token.py); raises token.TokenFailed.
        def resume_pin(self, device: str, secret: SecretBuffer) -> bool | None: ...
        def resume_keyfile(self, device: str, keyfile: str, size: int, offset: int) -> None: ...
        def present(self, device: str) -> bool: ...
        def late_devices(self, planned: list[DevicePlan]) -> list[DevicePlan]: ...
        def deactivate(self, device: str) -> None: ...
        def backoff(self, failures: int) -> None: ...
        def reopen_terminal(self) -> None: ...
        def power_off(self, why: str) -> None: ...


def run_cycle(
    ops: Ops,
    devices: list[DevicePlan],
    record: CycleRecord,
    poweroff_after: int = 0,
    *,
    sleeps: bool = True,
    drop_page_cache: bool = False,
) -> None:
    """devices in suspend order: upper layers first. `sleeps`: False for Lock(), the same
    cycle without the sleep write (the prompt comes right after the verification).

    Before the sleep, nothing may block without a deadline (SPEC 2.8): the sync, the freeze
    and each syncfs have one (the Ops raise past it), and so has the wait for the KDF
    reserve (past it the keys go all the same). Whatever goes wrong before the sleep
    abandons the cycle: what was suspended is resumed, sync_on_suspend restored, everything
    thawed, and the machine stays awake; the record says why."""
    frozen: list[str] = []
    suspended: list[str] = []
    saved_sync: str | None = None
    try:
        try:
            # sync() first, while nothing is frozen: a FUSE server must still answer.
            record.step("sync_start")
            ops.sync()
            record.step("synced")
            try:
                ops.wait_vt()
            except Exception as e:
                # The prompt then shows on whatever VT is in front, or on none: the user
                # can still switch to it; no reason to keep the keys in RAM.
                record.problems.append(f"VT switch: {e}")
            record.step("vt_switched")
            try:
                ops.wait_watchdogs()
                record.step("watchdogs_off")
            except Exception as e:
                # Frozen services may be killed by PID 1 during a long prompt (SPEC 2.4);
                # the keys still go.
                record.problems.append(f"service watchdogs: {e}")
            record.step("freeze_start")
            ops.freeze(frozen)
            record.step("frozen")
            # What was written between sync() and the freeze; block-backed file systems
            # only, whose writes need no process that is now frozen.
            for err in ops.syncfs():
                record.problems.append(f"syncfs: {err}")
            record.step("filesystems_synced")
            saved_sync = ops.get_sync_on_suspend()
            if saved_sync not in (None, "0"):
                ops.set_sync_on_suspend("0")
            record.step("sync_on_suspend_off")
            if drop_page_cache:
                _drop_page_cache(ops, record)
            devices = opened_late(ops, devices, record) + devices
            try:
                ops.reserve_ready()
            except Exception as e:
                # The keys still go: the KDF may find the memory at resume all the same.
                record.problems.append(f"KDF reserve: {e}")
            record.step("kdf_reserve_ready")
            _suspend_all(ops, devices, suspended, record)
            for name in suspended:
                try:
                    record.verification[name] = ops.verify(name)
                except Exception as e:
                    record.verification[name] = {"dm_table_key": f"error: {e}"}
            record.step("verified")
        except Exception as e:
            record.fail(f"abandoned before the sleep, staying awake: {e or type(e).__name__}")
            record.step("abandoned")
            return
        if not sleeps:
            record.step("locked")  # Lock(): straight to the prompt (wind_down)
            return
        record.step("sleep")
        try:
            ops.enter_sleep()
        except SleepFailed as e:
            record.fail(str(e))
            record.step("sleep_failed")
        except Exception as e:
            record.fail(str(e) or type(e).__name__)
        else:
            record.slept = True
            record.step("woke")
    finally:
        wind_down(
            ops, devices, suspended, frozen, saved_sync, record, poweroff_after, sleep_again=sleeps
        )


def _suspend_all(
    ops: Ops, devices: list[DevicePlan], suspended: list[str], record: CycleRecord
) -> None:
    """Each device's crypt_suspend freezes its file system and suspends it, and each of
    those waits out several RCU grace periods: 60-70 ms a device under TCG, against 20
    with expedited grace periods (issue 12). The kernel expedites them itself from its
    own suspend on (PM_SUSPEND_PREPARE), so the knob is on for the suspends only, and
    back before the sleep; the recovery and the daemon's repair put it back should we
    die in between. Nothing but speed depends on it: a failure is only noted."""
    try:
        saved = ops.expedite_rcu()
    except Exception as e:
        saved = None
        record.problems.append(f"rcu_expedited: {e}")
    if saved is not None:
        record.step("rcu_expedited")
    try:
        for dev in devices:
            try:
                ops.suspend(dev.name)
            except Exception as e:
                record.fail(f"suspending {dev.name}: {e}")
                continue
            suspended.append(dev.name)
            record.suspended.append(dev.name)
            record.step(f"suspended:{dev.name}")
    finally:
        if saved is not None:
            try:
                ops.restore_rcu(saved)
                record.step("rcu_restored")
            except Exception as e:
                record.problems.append(f"rcu_expedited left at 1: {e}")


def _drop_page_cache(ops: Ops, record: CycleRecord) -> None:
    # Asked for, but no reason to give up the cycle: the keys are what it protects.
    try:
        cleared = ops.drop_page_cache()
    except Exception as e:
        record.problems.append(f"dropping the page cache: {e}")
        return
    record.step("page_cache_dropped")
    record.page_cache_cleared_mib = cleared >> 20


def opened_late(ops: Ops, devices: list[DevicePlan], record: CycleRecord) -> list[DevicePlan]:
    """The LUKS devices opened after arming (issue 11): suspended too, first (nothing
    planned can sit on them), resumed last (they may sit on anything), never essential.
    A failure here leaves them out, and the record says their keys stayed."""
    try:
        late = ops.late_devices(devices)
    except Exception as e:
        record.problems.append(f"looking for devices opened after arming: {e}")
        return []
    for d in late:
        record.devices.append(d.name)
        record.problems.append(f"{d.name} was opened after arming: suspended too")
    return late


def late_plan(name: str, planned: list[DevicePlan]) -> DevicePlan:
    return DevicePlan(name, "passphrase", essential=False, after=[d.name for d in planned])


def essential_suspended(
    devices: list[DevicePlan], suspended: list[str], resumed: list[str]
) -> list[str]:
    return [
        d.name for d in devices if d.essential and d.name in suspended and d.name not in resumed
    ]


def wind_down(
    ops: Ops,
    devices: list[DevicePlan],
    suspended: list[str],
    frozen: list[str],
    saved_sync: str | None,
    record: CycleRecord,
    poweroff_after: int = 0,
    *,
    sleep_again: bool = True,
) -> None:
    """The second half of the cycle: resume what is suspended, restore sync_on_suspend, thaw.
    Shared by the cycle and the recovery of a dead helper (recover.py). Never thaws while an
    essential device is suspended: should something escape resume_all, that raises, and
    the process ends with the system frozen for the recovery to take over."""
    try:
        if suspended:
            resume_all(ops, devices, suspended, record, poweroff_after, sleep_again=sleep_again)
    finally:
        left = essential_suspended(devices, suspended, record.resumed)
        if left:
            # Only reached with an exception on its way (resume_all returns once all are
            # back): let it end the process rather than thaw onto a suspended root.
            record.fail(f"still suspended, so nothing was thawed: {', '.join(left)}")
        else:
            try:
                if saved_sync not in (None, "0"):
                    assert saved_sync is not None
                    ops.set_sync_on_suspend(saved_sync)
                    record.step("sync_on_suspend_restored")
            finally:
                for err in ops.thaw(frozen):
                    record.problems.append(f"thaw: {err}")
                record.step("thawed")
