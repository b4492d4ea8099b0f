from __future__ import annotations

import pytest

from cryptlockd.helper.cycle import (
    DeadlinePassed,
    DevicePlan,
    SleepFailed,
    late_plan,
    run_cycle,
    wind_down,
)
from cryptlockd.helper.kdf import ChildAttempt
from cryptlockd.helper.prompt_screen import PromptInfo
from cryptlockd.helper.record import CycleRecord
from cryptlockd.helper.resume import LINE, MAX_LOOP_PROBLEMS
from cryptlockd.helper.secret import SecretBuffer
from cryptlockd.helper.token import TokenFailed

GOOD = b"right one"


class OutOfInput(BaseException):
    """Nobody types any more: ends a test whose prompt loop would otherwise go on for good
    (the loop catches every Exception)."""


class FakeOps:
    def __init__(
        self,
        typed: list[bytes | str],
        *,
        sleep_fails: bool = False,
        freeze_fails: bool = False,
        sync_hangs: bool = False,
        vt_fails: bool = False,
        watchdogs_fail: bool = False,
        syncfs_hangs: bool = False,
        suspend_fails: str = "",
        keyfile_fails: bool = False,
        drop_fails: bool = False,
        lock_on_fault_fails: bool = False,
    ) -> None:
        self.calls: list[str] = []
        self.drop_fails = drop_fails
        self.lock_on_fault_fails = lock_on_fault_fails
        self.typed = list(typed)
        self.sleep_fails = sleep_fails
        self.freeze_fails = freeze_fails
        self.sync_hangs = sync_hangs
        self.vt_fails = vt_fails
        self.watchdogs_fail = watchdogs_fail
        self.syncfs_hangs = syncfs_hangs
        self.syncfs_errors: list[str] = []
        self.suspend_fails = suspend_fails
        self.keyfile_fails = keyfile_fails
        self.sync_on_suspend = "1"
        # /sys/kernel/rcu_expedited, and what each crypt_suspend and the sleep saw of it.
        self.rcu = "0"
        self.rcu_seen: list[str] = []
        self.rcu_fails = ""
        self.reserve_ready_at = -1
        self.reserve_fails = False
        self.secrets: list[SecretBuffer] = []
        self.gone: set[str] = set()
        self.late: list[str] = []
        # TPM2+PIN tokens (helper/token.py): device -> its PIN; a device absent has none.
        self.pins: dict[str, bytes] = {}
        self.token_broken = ""
        self.infos: list[PromptInfo] = []
        self.power_off_why = ""

    def freeze(self, frozen: list[str]) -> None:
        frozen.extend(["/system.slice", "/user.slice"])
        self.calls.append("freeze")
        if self.freeze_fails:
            raise RuntimeError("not frozen after 10 s: /user.slice")

    def thaw(self, frozen: list[str]) -> list[str]:
        self.calls.append("thaw:" + ",".join(reversed(frozen)))
        return []

    def sync(self) -> None:
        self.calls.append("sync")
        if self.sync_hangs:
            raise DeadlinePassed("sync() did not finish within 60 s")

    def wait_watchdogs(self) -> None:
        if self.watchdogs_fail:
            raise TimeoutError("the daemon did not say within 3 s")

    def wait_vt(self) -> None:
        self.calls.append("wait_vt")
        if self.vt_fails:
            raise TimeoutError("VT switch did not complete")

    def syncfs(self) -> list[str]:
        self.calls.append("syncfs")
        if self.syncfs_hangs:
            raise DeadlinePassed("syncfs(/mnt/loop-on-fuse) did not finish within 20 s")
        return self.syncfs_errors

    def get_sync_on_suspend(self) -> str | None:
        return self.sync_on_suspend

    def set_sync_on_suspend(self, value: str) -> None:
        self.calls.append(f"sync_on_suspend={value}")
        self.sync_on_suspend = value

    def expedite_rcu(self) -> str | None:
        if self.rcu_fails == "expedite":
            raise OSError("Permission denied: /sys/kernel/rcu_expedited")
        if self.rcu != "0":
            return None
        saved, self.rcu = self.rcu, "1"
        return saved

    def restore_rcu(self, value: str) -> None:
        if self.rcu_fails == "restore":
            raise OSError("Read-only file system: /sys/kernel/rcu_expedited")
        self.rcu = value

    def suspend(self, device: str) -> None:
        self.rcu_seen.append(f"{device}:{self.rcu}")
        if device == self.suspend_fails:
            raise OSError("EBUSY")
        self.calls.append(f"suspend:{device}")

    def verify(self, device: str) -> dict[str, str]:
        return {"dm_table_key": "zeroed", "dm_suspended": "yes"}

    def enter_sleep(self) -> None:
        self.rcu_seen.append(f"sleep:{self.rcu}")
        self.calls.append("sleep")
        if self.sleep_fails:
            raise SleepFailed("writing 'mem' to /sys/power/state: EBUSY")

    def reserve_ready(self) -> None:
        # Where in the calls (not one itself, so the orders below stay as they were).
        self.reserve_ready_at = len(self.calls)
        if self.reserve_fails:
            raise OSError("faulting in the KDF reserve: Cannot allocate memory")

    def release_reserve(self) -> None:
        self.calls.append("release_reserve")

    def lock_on_fault(self) -> None:
        self.calls.append("lock_on_fault")
        if self.lock_on_fault_fails:
            raise OSError("mlockall(MCL_ONFAULT): Invalid argument")

    def drop_page_cache(self) -> int:
        self.calls.append("drop_page_cache")
        if self.drop_fails:
            raise OSError("Permission denied: /proc/sys/vm/drop_caches")
        return 300 << 20

    def prompt(self, secret: SecretBuffer, info: PromptInfo) -> str:
        self.calls.append(
            f"prompt:{','.join(info.asking)}" + (" (skip?)" if info.skippable else "")
        )
        self.secrets.append(secret)
        self.infos.append(info)
        if not self.typed:
            raise OutOfInput(f"a prompt for {info.asking} with nothing left to type")
        phrase = self.typed.pop(0)
        if isinstance(phrase, str):  # a wake_watch reason, or resume.REDRAW
            return phrase
        secret.view()[: len(phrase)] = phrase
        secret.length = len(phrase)
        return LINE

    def refresh_header(self, device: str) -> None:
        self.calls.append(f"refresh:{device}")

    def late_devices(self, planned: list[DevicePlan]) -> list[DevicePlan]:
        return [late_plan(n, planned) for n in self.late]

    def present(self, device: str) -> bool:
        return device not in self.gone

    def deactivate(self, device: str) -> None:
        self.calls.append(f"close:{device}")

    def resume_passphrase(self, device: str, secret: SecretBuffer) -> bool:
        ok = bytes(secret.buf[: secret.length]) == GOOD
        if ok:
            self.calls.append(f"resume:{device}")
        return ok

    def passphrase_children(
        self, names: list[str], secret: SecretBuffer
    ) -> dict[str, ChildAttempt]:
        return {}  # threads, as where no child can be had (test_helper_kdf.py forks)

    def resume_pin(self, device: str, secret: SecretBuffer) -> bool | None:
        if device not in self.pins:
            return None
        self.calls.append(f"pin:{device}")
        if self.token_broken:
            raise TokenFailed(self.token_broken)
        return bytes(secret.buf[: secret.length]) == self.pins[device]

    def resume_keyfile(self, device: str, keyfile: str, size: int, offset: int) -> None:
        if self.keyfile_fails:
            raise OSError("No such file")
        self.calls.append(
            f"keyfile:{device}:{keyfile}" + (f":{size}@{offset}" if size or offset else "")
        )

    def backoff(self, failures: int) -> None:
        self.calls.append(f"backoff:{failures}")

    def reopen_terminal(self) -> None:
        self.calls.append("reopen")

    def power_off(self, why: str) -> None:
        self.calls.append("power_off")
        self.power_off_why = why


# Suspend order: the upper layer (nested, on root) first; data takes a keyfile on root.
DEVICES = [
    DevicePlan("nested", "passphrase", after=["root"]),
    DevicePlan("root", "passphrase"),
    DevicePlan("data", "keyfile:/etc/keys/data.key", after=["root"]),
]


def cycle(ops: FakeOps, poweroff_after: int = 0) -> CycleRecord:
    rec = CycleRecord([d.name for d in DEVICES])
    run_cycle(ops, DEVICES, rec, poweroff_after)
    rec.finish()
    return rec


def test_full_cycle_order() -> None:
    ops = FakeOps([GOOD])
    rec = cycle(ops)
    assert ops.calls == [
        "sync",
        "wait_vt",
        "freeze",
        "syncfs",
        "sync_on_suspend=0",
        "suspend:nested",
        "suspend:root",
        "suspend:data",
        "sleep",
        "release_reserve",
        # root's header is read before its prompt, not between Enter and its resume.
        "refresh:root",
        "prompt:root",
        "resume:root",
        "refresh:data",
        "keyfile:data:/etc/keys/data.key",
        "refresh:nested",
        "resume:nested",
        "sync_on_suspend=1",
        "thaw:/user.slice,/system.slice",
    ]
    assert rec.success and rec.slept and rec.reason == ""
    d = rec.as_dict()
    assert list(d["timeline_ms"])[:8] == [
        "sync_start",
        "synced",
        "vt_switched",
        "watchdogs_off",
        "freeze_start",
        "frozen",
        "filesystems_synced",
        "sync_on_suspend_off",
    ]
    assert d["resumed"] == ["root", "data", "nested"] and d["skipped"] == []


def test_rcu_expedited_is_on_for_the_suspends_only() -> None:
    ops = FakeOps([GOOD])
    t = cycle(ops).as_dict()["timeline_ms"]
    assert ops.rcu_seen == ["nested:1", "root:1", "data:1", "sleep:0"] and ops.rcu == "0"
    assert t["sync_on_suspend_off"] <= t["rcu_expedited"] <= t["suspended:nested"], t
    assert t["suspended:data"] <= t["rcu_restored"] <= t["verified"], t


def test_rcu_expedited_is_put_back_when_a_suspend_fails() -> None:
    ops = FakeOps([GOOD], suspend_fails="data")
    rec = cycle(ops)
    assert ops.rcu_seen[:3] == ["nested:1", "root:1", "data:1"] and ops.rcu == "0"
    assert "rcu_restored" in rec.as_dict()["timeline_ms"]


@pytest.mark.parametrize("where", ["expedite", "restore"])
def test_rcu_expedited_that_cannot_be_set_or_put_back_is_a_problem_not_an_end(
    where: str,
) -> None:
    ops = FakeOps([GOOD])
    ops.rcu_fails = where
    rec = cycle(ops)
    assert rec.success and rec.slept and "sleep" in ops.calls
    assert [p for p in rec.problems if "rcu_expedited" in p] == [
        "rcu_expedited: Permission denied: /sys/kernel/rcu_expedited"
        if where == "expedite"
        else "rcu_expedited left at 1: Read-only file system: /sys/kernel/rcu_expedited"
    ]


def test_rcu_expedited_already_on_is_left_alone() -> None:
    ops = FakeOps([GOOD])
    ops.rcu = "1"
    t = cycle(ops).as_dict()["timeline_ms"]
    assert ops.rcu == "1" and "rcu_expedited" not in t and "rcu_restored" not in t


def test_the_kdf_reserve_is_in_before_the_first_suspend() -> None:
    ops = FakeOps([GOOD])
    t = cycle(ops).as_dict()["timeline_ms"]
    assert ops.calls[ops.reserve_ready_at] == "suspend:nested", ops.calls
    assert t["sync_on_suspend_off"] <= t["kdf_reserve_ready"] <= t["suspended:nested"], t


def test_a_kdf_reserve_not_all_in_is_a_problem_and_the_keys_still_go() -> None:
    ops = FakeOps([GOOD])
    ops.reserve_fails = True
    rec = cycle(ops)
    assert rec.success and rec.slept and "suspend:root" in ops.calls
    assert rec.problems == ["KDF reserve: faulting in the KDF reserve: Cannot allocate memory"]


def test_passphrase_buffer_is_zero_after_use() -> None:
    ops = FakeOps([b"wrong", GOOD])
    cycle(ops)
    assert ops.secrets and all(s.is_zero() for s in ops.secrets)


def test_wrong_passphrases_keep_asking_with_backoff() -> None:
    ops = FakeOps([b"a", b"b", b"c", GOOD])
    rec = cycle(ops)
    assert [c for c in ops.calls if c.startswith(("prompt", "backoff"))] == [
        "prompt:root",
        "backoff:1",
        "prompt:root",
        "backoff:2",
        "prompt:root",
        "backoff:3",
        "prompt:root",
    ]
    assert rec.wrong_passphrases == 3 and rec.success


def test_power_off_after_n_failures() -> None:
    ops = FakeOps([b"a", b"b", GOOD])
    cycle(ops, poweroff_after=2)
    assert ops.calls.index("power_off") == ops.calls.index("backoff:1") + 2


def test_failed_sleep_write_goes_straight_to_prompt() -> None:
    ops = FakeOps([GOOD], sleep_fails=True)
    rec = cycle(ops)
    assert ops.calls[ops.calls.index("sleep") + 1 : ops.calls.index("sleep") + 4] == [
        "release_reserve",
        "refresh:root",
        "prompt:root",
    ]
    assert not rec.success and not rec.slept and "EBUSY" in rec.reason
    assert ops.calls[-1].startswith("thaw") and ops.sync_on_suspend == "1"


def test_a_header_that_cannot_be_read_again_is_a_problem_not_an_end() -> None:
    ops = FakeOps([GOOD])

    def refresh(device: str) -> None:
        ops.calls.append(f"refresh:{device}")
        if device == "data":
            raise OSError("EIO")

    ops.refresh_header = refresh  # type: ignore[method-assign]
    rec = cycle(ops)
    assert rec.success  # the header loaded before the sleep still serves
    assert "re-reading the header of data: EIO" in rec.problems


# -- SPEC 2.8: nothing before the sleep without a deadline; past one, the cycle is abandoned --


def assert_abandoned(ops: FakeOps, rec: CycleRecord, why: str) -> None:
    """Nothing suspended, sync_on_suspend untouched, no sleep, no prompt, the cgroups thawed
    last, and the record says why."""
    assert not [
        c for c in ops.calls if c.startswith(("suspend:", "sync_on_suspend", "sleep", "prompt"))
    ], ops.calls
    assert ops.calls[-1].startswith("thaw:")
    assert ops.sync_on_suspend == "1"
    assert not rec.slept and not rec.success and not rec.suspended
    assert rec.reason == f"abandoned before the sleep, staying awake: {why}"
    d = rec.as_dict()
    assert d["result"] == "failed" and "abandoned" in d["timeline_ms"]
    assert "sleep" not in d["timeline_ms"]


def test_a_sync_past_its_deadline_abandons_the_cycle_before_the_freeze() -> None:
    # An NFS hard mount whose server has gone: sync() never returns.
    ops = FakeOps([], sync_hangs=True)
    rec = cycle(ops)
    assert ops.calls == ["sync", "thaw:"]  # nothing frozen, nothing to thaw
    assert_abandoned(ops, rec, "sync() did not finish within 60 s")
    assert "synced" not in rec.timeline


def test_a_syncfs_past_its_deadline_abandons_the_cycle_and_thaws() -> None:
    ops = FakeOps([], syncfs_hangs=True)
    rec = cycle(ops)
    assert ops.calls == ["sync", "wait_vt", "freeze", "syncfs", "thaw:/user.slice,/system.slice"]
    assert_abandoned(ops, rec, "syncfs(/mnt/loop-on-fuse) did not finish within 20 s")


def test_a_vt_switch_that_never_completes_costs_the_screen_not_the_protection() -> None:
    # A display server that never lets go of its VT: the prompt may not be in front, but
    # the cycle goes on (the user can switch to it), and the record says why.
    ops = FakeOps([GOOD], vt_fails=True)
    rec = cycle(ops)
    assert ops.calls[:3] == ["sync", "wait_vt", "freeze"]
    assert "suspend:root" in ops.calls and "sleep" in ops.calls
    assert rec.success and rec.slept
    assert rec.problems == ["VT switch: VT switch did not complete"]


def test_no_word_on_the_service_watchdogs_costs_no_protection() -> None:
    ops = FakeOps([GOOD], watchdogs_fail=True)
    rec = cycle(ops)
    assert "suspend:root" in ops.calls and rec.success and rec.slept
    assert rec.problems == ["service watchdogs: the daemon did not say within 3 s"]
    assert "watchdogs_off" not in rec.timeline


def test_freeze_timeout_touches_no_device_and_thaws() -> None:
    ops = FakeOps([], freeze_fails=True)
    rec = cycle(ops)
    # Everything it asked to freeze is thawed, frozen or not yet.
    assert ops.calls == ["sync", "wait_vt", "freeze", "thaw:/user.slice,/system.slice"]
    assert_abandoned(ops, rec, "not frozen after 10 s: /user.slice")


def test_syncfs_errors_are_problems_and_the_cycle_goes_on() -> None:
    ops = FakeOps([GOOD])
    ops.syncfs_errors = ["/boot: syncfs: Input/output error"]
    rec = cycle(ops)
    assert rec.success and "syncfs: /boot: syncfs: Input/output error" in rec.problems


def test_an_unexpected_error_from_the_sleep_write_still_prompts() -> None:
    ops = FakeOps([GOOD])

    def enter_sleep() -> None:
        ops.calls.append("sleep")
        raise RuntimeError("odd")

    ops.enter_sleep = enter_sleep  # type: ignore[method-assign]
    rec = cycle(ops)
    assert "prompt:root" in ops.calls and ops.calls[-1].startswith("thaw")
    assert rec.reason == "odd" and not rec.slept and rec.resumed == ["root", "data", "nested"]


def test_keyfile_failure_falls_back_to_prompt() -> None:
    ops = FakeOps([GOOD, GOOD], keyfile_fails=True)
    rec = cycle(ops)
    # The passphrase typed for root is tried on data at once: one prompt.
    assert [c for c in ops.calls if c.startswith("prompt")] == ["prompt:root"]
    assert "resume:data" in ops.calls and any("keyfile for data" in p for p in rec.problems)
    assert rec.success


def test_suspend_failure_is_reported_and_rest_still_resumed() -> None:
    ops = FakeOps([GOOD], suspend_fails="root")
    rec = cycle(ops)
    assert "suspend:root" not in ops.calls and "resume:nested" in ops.calls
    assert not rec.success and "suspending root" in rec.reason


def test_unverified_wipe_fails_the_cycle() -> None:
    ops = FakeOps([GOOD])
    ops.verify = lambda device: {"dm_table_key": "present"}  # type: ignore[method-assign]
    rec = cycle(ops)
    assert not rec.success and "verified" in rec.reason


@pytest.mark.parametrize("source,keyfile", [("passphrase", None), ("keyfile:/k", "/k")])
def test_device_plan_keyfile(source: str, keyfile: str | None) -> None:
    assert DevicePlan("x", source).keyfile == keyfile


def test_keyfile_size_and_offset_reach_the_resume() -> None:
    ops = FakeOps([GOOD])
    devices = [DevicePlan("root", "passphrase"), DevicePlan("data", "keyfile:/k", 64, 4096)]
    rec = CycleRecord([d.name for d in devices])
    run_cycle(ops, devices, rec)
    rec.finish()
    assert "keyfile:data:/k:64@4096" in ops.calls and rec.success


def test_a_failing_prompt_is_retried_not_fatal() -> None:
    ops = FakeOps([GOOD])
    fail_prompt(ops, [OSError("EIO on the VT")])
    rec = cycle(ops)
    assert rec.success and any("EIO" in p for p in rec.problems)


# -- SPEC 2.8: the prompt loop survives any exception; nothing thawed on a suspended root --


def test_a_failing_backoff_after_a_wrong_passphrase_reopens_the_vt_and_keeps_prompting() -> None:
    # A hung-up VT: tcflush in the back-off raises EIO. It used to escape the loop, and the
    # finally thawed everything with root still suspended.
    ops = FakeOps([b"wrong", GOOD])

    def backoff(failures: int) -> None:
        ops.calls.append(f"backoff:{failures}")
        if failures == 1 and "reopen" not in ops.calls:
            raise OSError(5, "Input/output error")

    ops.backoff = backoff  # type: ignore[method-assign]
    rec = cycle(ops)
    tail = [c for c in ops.calls if c.startswith(("prompt", "backoff", "reopen", "resume"))]
    assert tail == [
        "prompt:root",
        "backoff:1",
        "reopen",
        "backoff:1",
        "prompt:root",
        "resume:root",
        "resume:nested",
    ]
    assert rec.success and any("Input/output error" in p for p in rec.problems)
    assert ops.calls[-1].startswith("thaw")


def fail_prompt(ops: FakeOps, errors: list[OSError]) -> None:
    """The prompt raises each of `errors` in turn (as a hung-up VT does), then answers."""
    real = ops.prompt

    def flaky(secret: SecretBuffer, info: PromptInfo) -> str:
        if errors:
            raise errors.pop()
        return real(secret, info)

    ops.prompt = flaky  # type: ignore[method-assign]


def test_a_failing_reopen_and_backoff_never_end_the_loop() -> None:
    ops = FakeOps([GOOD])
    fail_prompt(ops, [OSError("EIO on the VT")] * 3)

    def broken() -> None:
        ops.calls.append("reopen")
        raise OSError("ENXIO")

    def broken_backoff(failures: int) -> None:
        ops.calls.append("backoff")
        raise OSError("EIO")

    ops.reopen_terminal = broken  # type: ignore[method-assign]
    ops.backoff = broken_backoff  # type: ignore[method-assign]
    rec = cycle(ops)
    assert rec.success and ops.calls.count("reopen") == 3
    assert "reopening the VT: ENXIO" in rec.problems and "back-off: EIO" in rec.problems


def test_a_vt_that_keeps_failing_fills_the_record_only_so_far() -> None:
    ops = FakeOps([GOOD])
    fail_prompt(ops, [OSError(f"EIO #{i}") for i in range(3 * MAX_LOOP_PROBLEMS)])
    rec = cycle(ops)
    assert rec.success
    assert len([p for p in rec.problems if p.startswith("prompt:")]) == MAX_LOOP_PROBLEMS


def test_the_same_error_again_and_again_is_recorded_once() -> None:
    ops = FakeOps([GOOD])
    fail_prompt(ops, [OSError("end of file on VT 8")] * 5)
    rec = cycle(ops)
    assert rec.problems.count("prompt: end of file on VT 8") == 1


def test_a_failing_power_off_keeps_prompting() -> None:
    ops = FakeOps([b"a", GOOD])

    def power_off(why: str) -> None:
        ops.calls.append("power_off")
        raise OSError("EPERM")

    ops.power_off = power_off  # type: ignore[method-assign]
    rec = cycle(ops, poweroff_after=1)
    assert "power_off" in ops.calls and rec.success


def test_failing_reserve_and_header_refresh_do_not_stop_the_resume() -> None:
    ops = FakeOps([GOOD])

    def boom(*args: object) -> list[str]:
        raise OSError("EIO")

    ops.release_reserve = boom  # type: ignore[method-assign,assignment]
    ops.refresh_header = boom  # type: ignore[method-assign,assignment]
    rec = cycle(ops)
    assert rec.success and "resume:root" in ops.calls
    assert "releasing the KDF reserve: EIO" in rec.problems
    assert "re-reading the header of nested: EIO" in rec.problems


def test_nothing_is_thawed_while_an_essential_device_is_suspended() -> None:
    # Something the loop does not catch (here a KeyboardInterrupt at the prompt) leaves
    # root suspended: no thaw and no sync_on_suspend; the process ends and the recovery
    # (the unit's ExecStopPost=) takes over.
    ops = FakeOps([])

    def interrupted(secret: SecretBuffer, info: PromptInfo) -> str:
        raise KeyboardInterrupt

    ops.prompt = interrupted  # type: ignore[method-assign]
    rec = CycleRecord([d.name for d in DEVICES])
    with pytest.raises(KeyboardInterrupt):
        run_cycle(ops, DEVICES, rec)
    assert not any(c.startswith(("thaw", "sync_on_suspend=1")) for c in ops.calls)
    assert "still suspended, so nothing was thawed: nested, root, data" in rec.reason
    assert rec.skipped == []


def test_a_suspended_device_that_is_not_essential_does_not_hold_the_thaw() -> None:
    ops = FakeOps([GOOD])
    # Suspend order: usb first, so root is tried first at resume.
    devices = [DevicePlan("usb", "passphrase", essential=False), DevicePlan("root", "passphrase")]
    real = ops.resume_passphrase

    def resume(device: str, secret: SecretBuffer) -> bool:
        if device == "usb":
            raise KeyboardInterrupt
        return real(device, secret)

    ops.resume_passphrase = resume  # type: ignore[method-assign]
    rec = CycleRecord(["usb", "root"])
    with pytest.raises(KeyboardInterrupt):
        run_cycle(ops, devices, rec)
    assert "resume:root" in ops.calls and ops.calls[-1].startswith("thaw")


def test_wind_down_with_nothing_suspended_restores_and_thaws() -> None:
    # The recovery of a helper that died after the freeze, before any crypt_suspend.
    ops = FakeOps([])
    rec = CycleRecord(["root"])
    wind_down(ops, [DevicePlan("root", "passphrase")], [], ["/system.slice"], "1", rec)
    assert ops.calls == ["sync_on_suspend=1", "thaw:/system.slice"]


def test_wind_down_resumes_only_what_is_suspended() -> None:
    ops = FakeOps([GOOD])
    rec = CycleRecord([d.name for d in DEVICES])
    wind_down(ops, DEVICES, ["nested"], ["/user.slice"], None, rec)
    assert [c for c in ops.calls if c.startswith(("prompt", "resume", "keyfile"))] == [
        "prompt:nested",
        "resume:nested",
    ]
    assert ops.calls[-1] == "thaw:/user.slice" and rec.resumed == ["nested"]


def test_device_plan_round_trips_through_the_cycle_state() -> None:
    plan = DevicePlan("data", "keyfile:/k", 64, 8, essential=False)
    back = DevicePlan.from_dict(plan.as_dict())
    assert repr(back) == repr(plan)
    assert DevicePlan.from_dict({"name": "r", "key_source": "passphrase"}).essential


def test_a_device_opened_after_arming_is_suspended_first_and_resumed_last() -> None:
    ops = FakeOps([GOOD])
    ops.late = ["stick"]
    rec = cycle(ops)
    suspends = [c for c in ops.calls if c.startswith("suspend")]
    assert suspends == ["suspend:stick", "suspend:nested", "suspend:root", "suspend:data"]
    assert rec.resumed[-1] == "stick" and rec.success
    assert "stick" in rec.devices and "stick was opened after arming: suspended too" in rec.problems


def test_a_failing_look_for_late_devices_is_a_problem_not_an_end() -> None:
    ops = FakeOps([GOOD])

    def broken(planned: list[DevicePlan]) -> list[DevicePlan]:
        raise OSError("EIO")

    ops.late_devices = broken  # type: ignore[method-assign]
    rec = cycle(ops)
    assert rec.success and "looking for devices opened after arming: EIO" in rec.problems


# -- Lock() and the page cache (issue 14) ---------------------------------------------------


def lock(ops: FakeOps, **kw: bool) -> CycleRecord:
    rec = CycleRecord([d.name for d in DEVICES])
    rec.action = "lock"
    run_cycle(ops, DEVICES, rec, sleeps=False, **kw)
    rec.finish()
    return rec


def test_a_lock_is_the_cycle_without_the_sleep_write() -> None:
    ops = FakeOps([GOOD])
    rec = lock(ops)
    assert "sleep" not in ops.calls
    assert ops.calls[:8] == [
        "sync",
        "wait_vt",
        "freeze",
        "syncfs",
        "sync_on_suspend=0",
        "suspend:nested",
        "suspend:root",
        "suspend:data",
    ]
    assert ops.calls[-1] == "thaw:/user.slice,/system.slice"
    assert rec.success and not rec.slept and rec.reason == ""
    d = rec.as_dict()
    assert d["action"] == "lock" and d["result"] == "success"
    steps = list(d["timeline_ms"])
    assert steps.index("verified") < steps.index("locked") < steps.index("prompt")


def test_a_lock_abandoned_before_the_prompt_fails() -> None:
    ops = FakeOps([GOOD], freeze_fails=True)
    rec = lock(ops)
    assert not rec.success and "abandoned before the sleep" in rec.reason
    assert "locked" not in rec.timeline and not [c for c in ops.calls if c.startswith("prompt")]


def test_a_sleep_that_never_slept_does_not_pass_for_a_lock() -> None:
    ops = FakeOps([GOOD], sleep_fails=True)
    rec = CycleRecord([d.name for d in DEVICES])
    run_cycle(ops, DEVICES, rec)
    rec.finish()
    assert not rec.success and rec.as_dict()["action"] == "suspend"


def test_page_cache_dropped_after_the_sync_before_the_suspend() -> None:
    ops = FakeOps([GOOD])
    rec = CycleRecord([d.name for d in DEVICES])
    run_cycle(ops, DEVICES, rec, drop_page_cache=True)
    rec.finish()
    assert ops.calls[:7] == [
        "sync",
        "wait_vt",
        "freeze",
        "syncfs",
        "sync_on_suspend=0",
        "drop_page_cache",
        "suspend:nested",
    ]
    assert rec.success and rec.page_cache_cleared_mib == 300
    steps = list(rec.as_dict()["timeline_ms"])
    assert steps.index("filesystems_synced") < steps.index("page_cache_dropped")
    assert steps.index("page_cache_dropped") < steps.index("suspended:nested")


def test_page_cache_off_by_default_and_a_failed_drop_costs_no_protection() -> None:
    ops = FakeOps([GOOD])
    cycle(ops)
    assert "drop_page_cache" not in ops.calls
    ops = FakeOps([GOOD], drop_fails=True)
    rec = CycleRecord([d.name for d in DEVICES])
    run_cycle(ops, DEVICES, rec, drop_page_cache=True)
    rec.finish()
    assert rec.success and rec.page_cache_cleared_mib == -1
    assert rec.problems == ["dropping the page cache: Permission denied: /proc/sys/vm/drop_caches"]
    assert "suspend:root" in ops.calls


def test_a_lock_has_no_sleep_to_go_back_to() -> None:
    # Esc, the lid and an unanswered wake put a sleeping machine back to sleep; in a lock
    # the prompt just stays, and Esc is not offered on its screen.
    ops = FakeOps([bytes([0x1B]), "lid", "unanswered", GOOD])
    rec = lock(ops)
    assert "sleep" not in ops.calls and rec.slept_again == []
    assert rec.success and all(not info.sleep_again for info in ops.infos)
