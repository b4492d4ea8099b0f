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
from cryptlockd.helper.secret import SecretBuffer

# Not typing.TYPE_CHECKING: importing typing (and dataclasses) would grow the RAM
# filesystem and the helper's start-up time; mypy honours any name TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any, Protocol

# The record keeps at most this many problems from the prompt loop: a VT that keeps
# failing must not grow it without bound while the user takes their time.
MAX_LOOP_PROBLEMS = 20


class DevicePlan:
    __slots__ = ("essential", "key_source", "keyfile_offset", "keyfile_size", "name")

    def __init__(
        self,
        name: str,
        key_source: str,
        keyfile_size: int = 0,
        keyfile_offset: int = 0,
        essential: bool = True,
    ) -> None:
        self.name = name
        self.key_source = key_source  # "passphrase" or "keyfile:<path>"
        # crypttab's keyfile-size= and keyfile-offset=, in bytes; 0: the whole file.
        self.keyfile_size = keyfile_size
        self.keyfile_offset = keyfile_offset
        # Holds /, /usr, /var, swap or a keyfile (SPEC 2.8): nothing may be thawed while
        # it is suspended. True unless the daemon knows better.
        self.essential = essential

    def __repr__(self) -> str:
        return (
            f"DevicePlan({self.name!r}, {self.key_source!r}, {self.keyfile_size}, "
            f"{self.keyfile_offset}, essential={self.essential})"
        )

    def as_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "key_source": self.key_source,
            "keyfile_size": self.keyfile_size,
            "keyfile_offset": self.keyfile_offset,
            "essential": self.essential,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DevicePlan:
        return cls(
            str(d["name"]),
            str(d["key_source"]),
            int(d.get("keyfile_size", 0)),
            int(d.get("keyfile_offset", 0)),
            bool(d.get("essential", True)),
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
        def syncfs(self) -> list[str]: ...
        def get_sync_on_suspend(self) -> str | None: ...
        def set_sync_on_suspend(self, value: str) -> None: ...
        def suspend(self, device: str) -> None: ...
        def verify(self, device: str) -> dict[str, str]: ...
        def enter_sleep(self) -> None: ...
        def release_reserve(self) -> None: ...
        def refresh_headers(self, devices: list[str]) -> list[str]: ...
        def prompt(self, secret: SecretBuffer, devices: list[str], failures: int) -> bool: ...
        def resume_passphrase(self, device: str, secret: SecretBuffer) -> bool: ...
        def resume_keyfile(self, device: str, keyfile: str, size: int, offset: int) -> None: ...
        def backoff(self, failures: int) -> None: ...
        def reopen_terminal(self) -> None: ...
        def power_off(self) -> None: ...


def run_cycle(
    ops: Ops, devices: list[DevicePlan], record: CycleRecord, poweroff_after: int = 0
) -> None:
    """devices in suspend order: upper layers first.

    Before the sleep, nothing may block without a deadline (SPEC 2.8): the sync, the freeze
    and each syncfs have one (the Ops raise past it). Whatever goes wrong before the sleep
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
            for dev in devices:
                try:
                    ops.suspend(dev.name)
                except Exception as e:
                    record.fail(f"suspending {dev.name}: {e}")
                    continue
                suspended.append(dev.name)
                record.suspended.append(dev.name)
                record.step(f"suspended:{dev.name}")
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
        wind_down(ops, devices, suspended, frozen, saved_sync, record, poweroff_after)


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
) -> None:
    """The second half of the cycle: resume what is suspended, restore sync_on_suspend, thaw.
    Shared by the cycle and the recovery of a dead helper (recover.py). Never thaws while an
    essential device is suspended: should something escape resume_all, that raises, and
    the process ends with the system frozen for the recovery to take over."""
    try:
        if suspended:
            resume_all(ops, devices, suspended, record, poweroff_after)
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


def _note(record: CycleRecord, problem: str, counted: list[int]) -> None:
    """A problem of the prompt loop, into the record, without repeats and within bounds."""
    if record.problems and record.problems[-1] == problem:
        return
    if counted[0] < MAX_LOOP_PROBLEMS:
        counted[0] += 1
        record.problems.append(problem)


def _recover_terminal(ops: Ops, record: CycleRecord, counted: list[int]) -> None:
    """After an error at the prompt: open the VT again (a hung-up VT answers EIO or end of
    file for good on the old file), then wait a little. Neither may end the loop."""
    try:
        ops.reopen_terminal()
    except Exception as e:
        _note(record, f"reopening the VT: {e or type(e).__name__}", counted)
    try:
        ops.backoff(1)
    except Exception as e:
        _note(record, f"back-off: {e or type(e).__name__}", counted)


def resume_all(
    ops: Ops,
    devices: list[DevicePlan],
    suspended: list[str],
    record: CycleRecord,
    poweroff_after: int = 0,
) -> None:
    """Bottom-up: the passphrase devices (one prompt serves all that share it), then the
    keyfile devices, whose keyfiles may live on a filesystem that has just come back.
    Reading a keyfile earlier could block on a suspended disk for good. Returns only when
    every device is back: any Exception in a round (the VT, the back-off, libcryptsetup)
    goes into the record, the VT is opened again, and the next round prompts again."""
    pending = [d for d in reversed(devices) if d.name in suspended]
    keyfile_failed: set[str] = set()
    failures = [0]
    counted = [0]
    try:
        ops.release_reserve()
    except Exception as e:
        record.problems.append(f"releasing the KDF reserve: {e}")
    # The headers were read before the sleep, maybe long before (the idle helper loads
    # them): a keyslot changed since must count now.
    try:
        record.problems.extend(ops.refresh_headers([d.name for d in pending]))
    except Exception as e:
        record.problems.append(f"re-reading the headers: {e}")
    record.step("headers_reloaded")
    with SecretBuffer() as secret:
        while pending:
            try:
                _resume_round(
                    ops, pending, keyfile_failed, secret, record, failures, poweroff_after
                )
            except Exception as e:
                secret.wipe()
                _note(record, f"prompt: {e or type(e).__name__}", counted)
                _recover_terminal(ops, record, counted)


def _resume_round(
    ops: Ops,
    pending: list[DevicePlan],
    keyfile_failed: set[str],
    secret: SecretBuffer,
    record: CycleRecord,
    failures: list[int],
    poweroff_after: int,
) -> None:
    """One round: the keyfile devices once nothing else is pending, or one prompt and the
    passphrase tried on every device that asks. Removes what resumed from `pending`."""
    asking = [d for d in pending if d.keyfile is None or d.name in keyfile_failed]
    if not asking:
        for dev in list(pending):
            assert dev.keyfile is not None
            try:
                ops.resume_keyfile(dev.name, dev.keyfile, dev.keyfile_size, dev.keyfile_offset)
            except Exception as e:
                record.problems.append(f"keyfile for {dev.name}: {e}")
                keyfile_failed.add(dev.name)
                continue
            pending.remove(dev)
            record.resumed.append(dev.name)
            record.step(f"resumed:{dev.name}")
        return
    record.step("prompt")
    if not ops.prompt(secret, [d.name for d in asking], failures[0]):
        secret.wipe()
        return
    record.step("passphrase_entered")
    took = False
    try:
        for dev in asking:
            try:
                ok = ops.resume_passphrase(dev.name, secret)
            except Exception as e:
                record.problems.append(f"resuming {dev.name}: {e}")
                continue
            if ok:
                took = True
                pending.remove(dev)
                record.resumed.append(dev.name)
                record.step(f"resumed:{dev.name}")
    finally:
        secret.wipe()
    if took:
        failures[0] = 0
        return
    failures[0] += 1
    record.wrong_passphrases += 1
    if poweroff_after and failures[0] >= poweroff_after:
        ops.power_off()
    ops.backoff(failures[0])
