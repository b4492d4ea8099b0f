"""The order of the protected sleep (SPEC 2.4, 2.5), apart from the kernel calls.

Every path out of `run_cycle` leaves the devices resumed (it prompts until they are),
sync_on_suspend restored and the cgroups thawed: the structure is try/finally all the way
down. The kernel-facing steps come in through an `Ops` object, so the order and the error
paths are unit-tested with a fake.
"""

from __future__ import annotations

from cryptlockd.helper.record import CycleRecord
from cryptlockd.helper.secret import SecretBuffer

# Not typing.TYPE_CHECKING: importing typing (and dataclasses) would grow the RAM
# filesystem and the helper's start-up time; mypy honours any name TYPE_CHECKING.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Protocol


class DevicePlan:
    __slots__ = ("key_source", "keyfile_offset", "keyfile_size", "name")

    def __init__(
        self, name: str, key_source: str, keyfile_size: int = 0, keyfile_offset: int = 0
    ) -> None:
        self.name = name
        self.key_source = key_source  # "passphrase" or "keyfile:<path>"
        # crypttab's keyfile-size= and keyfile-offset=, in bytes; 0: the whole file.
        self.keyfile_size = keyfile_size
        self.keyfile_offset = keyfile_offset

    def __repr__(self) -> str:
        return (
            f"DevicePlan({self.name!r}, {self.key_source!r}, {self.keyfile_size}, "
            f"{self.keyfile_offset})"
        )

    @property
    def keyfile(self) -> str | None:
        return (
            self.key_source[len("keyfile:") :] if self.key_source.startswith("keyfile:") else None
        )


class SleepFailed(Exception):
    pass


if TYPE_CHECKING:

    class Ops(Protocol):
        def freeze(self, frozen: list[str]) -> None: ...
        def thaw(self, frozen: list[str]) -> list[str]: ...
        def sync(self) -> list[str]: ...
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
        def power_off(self) -> None: ...


def run_cycle(
    ops: Ops, devices: list[DevicePlan], record: CycleRecord, poweroff_after: int = 0
) -> None:
    """devices in suspend order: upper layers first."""
    frozen: list[str] = []
    suspended: list[str] = []
    saved_sync: str | None = None
    try:
        try:
            record.step("freeze_start")
            ops.freeze(frozen)
            record.step("frozen")
            for err in ops.sync():
                record.problems.append(f"sync: {err}")
            record.step("synced")
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
            record.step("sleep")
            try:
                ops.enter_sleep()
            except SleepFailed as e:
                record.fail(str(e))
                record.step("sleep_failed")
            else:
                record.slept = True
                record.step("woke")
        except Exception as e:
            record.fail(str(e) or type(e).__name__)
    finally:
        try:
            if suspended:
                resume_all(ops, devices, suspended, record, poweroff_after)
        finally:
            try:
                if saved_sync not in (None, "0"):
                    assert saved_sync is not None
                    ops.set_sync_on_suspend(saved_sync)
                    record.step("sync_on_suspend_restored")
            finally:
                for err in ops.thaw(frozen):
                    record.problems.append(f"thaw: {err}")
                record.step("thawed")


def resume_all(
    ops: Ops,
    devices: list[DevicePlan],
    suspended: list[str],
    record: CycleRecord,
    poweroff_after: int = 0,
) -> None:
    """Bottom-up: the passphrase devices (one prompt serves all that share it), then the
    keyfile devices, whose keyfiles may live on a filesystem that has just come back.
    Reading a keyfile earlier could block on a suspended disk for good."""
    pending = [d for d in reversed(devices) if d.name in suspended]
    keyfile_failed: set[str] = set()
    failures = 0
    ops.release_reserve()
    # The headers were read before the sleep, maybe long before (the idle helper loads
    # them): a keyslot changed since must count now.
    record.problems.extend(ops.refresh_headers([d.name for d in pending]))
    record.step("headers_reloaded")
    with SecretBuffer() as secret:
        while pending:
            asking = [d for d in pending if d.keyfile is None or d.name in keyfile_failed]
            if not asking:
                for dev in list(pending):
                    assert dev.keyfile is not None
                    try:
                        ops.resume_keyfile(
                            dev.name, dev.keyfile, dev.keyfile_size, dev.keyfile_offset
                        )
                    except Exception as e:
                        record.problems.append(f"keyfile for {dev.name}: {e}")
                        keyfile_failed.add(dev.name)
                        continue
                    pending.remove(dev)
                    record.resumed.append(dev.name)
                    record.step(f"resumed:{dev.name}")
                continue
            record.step("prompt")
            try:
                entered = ops.prompt(secret, [d.name for d in asking], failures)
            except Exception as e:
                # The devices stay suspended until a passphrase gets through: never give
                # up here, whatever the terminal does.
                record.problems.append(f"prompt: {e}")
                entered = False
                ops.backoff(1)
            if not entered:
                secret.wipe()
                continue
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
                failures = 0
                continue
            failures += 1
            record.wrong_passphrases += 1
            if poweroff_after and failures >= poweroff_after:
                ops.power_off()
            ops.backoff(failures)
