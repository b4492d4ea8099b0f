"""The daemon's state machine around one sleep (cryptlockd/daemon/sleep_cycle.py and
Manager.back_to_idle), with the bus replaced by a recorder (issue 10, defects 5-7): every
way a sleep can end leads back to idle, once, with LastCycle and CycleFinished, and a sleep
the helper did not run is reported unprotected, with its reason, in Problems too."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from cryptlockd.daemon import sleep_report
from cryptlockd.daemon.armer import ArmOptions, CycleCallback
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.daemon.manager import Manager
from cryptlockd.defs import State
from cryptlockd.errors import Busy, CryptlockdError
from tests.integration.recording_daemon import RecordingArmer
from tests.unit.test_manager import FakeBus, HangingArmer, closed, hold_fake_inhibitor, make_manager
from tests.wait import wait_until_async


class Armer(RecordingArmer):
    """Records, keeps the cycle callback, and says what disarm() finds."""

    def __init__(self, *, fail: str = "", busy: bool = False) -> None:
        super().__init__()
        self.fail, self.busy = fail, busy
        self.on_finished: CycleCallback | None = None
        # Whether logind's delay lock was still ours when disarm() ran.
        self.lock_held_at_disarm: list[bool] = []
        self.manager: Manager | None = None

    async def arm(
        self,
        devices: Sequence[LuksDevice],
        on_finished: CycleCallback,
        options: ArmOptions | None = None,
    ) -> None:
        if self.fail:
            raise CryptlockdError(self.fail)
        await super().arm(devices, on_finished, options)
        self.on_finished = on_finished

    async def disarm(self) -> bool:
        assert self.manager is not None
        self.lock_held_at_disarm.append(self.manager.logind.inhibitor_held)
        self.disarmed += 1
        return not self.busy


def manager(tmp_path: Path, armer: RecordingArmer, **kw: Any) -> tuple[Manager, FakeBus]:
    m, bus = make_manager(tmp_path, armer)
    if isinstance(armer, Armer):
        armer.manager = m
    m.cycle.deadline = kw.get("deadline", 60.0)
    hold_fake_inhibitor(m)
    m.refresh()
    return m, bus


def finished(bus: FakeBus) -> list[tuple[bool, dict[str, Any]]]:
    """The CycleFinished signals, their records unwrapped."""
    return [
        (sig.body[0], {k: v.value for k, v in sig.body[1].items()})
        for sig in bus.signals("CycleFinished")
    ]


def unprotected_line(m: Manager) -> str:
    [line] = [p for p in m.problems if p.startswith("last-cycle:")]
    return line


@pytest.mark.asyncio
async def test_prepare_for_sleep_false_without_a_cycle_is_an_unprotected_sleep(
    tmp_path: Path,
) -> None:
    # hybrid-sleep, suspend-then-hibernate, a drop-in that took our ExecStart= away.
    armer = Armer()
    m, bus = manager(tmp_path, armer)
    await m.prepare_for_sleep(True)
    assert m.state == State.ARMED and m.sleep is not None
    await m.prepare_for_sleep(False)
    assert armer.disarmed == 1
    assert m.state == State.IDLE and m.sleep is None
    [(ok, rec)] = finished(bus)
    assert not ok and rec["result"] == "unprotected"
    assert rec["reason"] == sleep_report.NO_CYCLE
    assert m.last_cycle["result"] == "unprotected"
    assert unprotected_line(m) == f"last-cycle: the last sleep was NOT protected: {rec['reason']}"


@pytest.mark.asyncio
async def test_the_record_ends_the_sleep_without_waiting_for_logind(tmp_path: Path) -> None:
    # Defect 5: logind killed mid-cycle never sends PrepareForSleep(false); the record
    # alone brings the state back to idle, and the next sleep is armed.
    armer = Armer()
    m, bus = manager(tmp_path, armer)
    await m.prepare_for_sleep(True)
    assert armer.on_finished is not None
    armer.on_finished(True, {"result": "success", "verification": {}})
    assert m.state == State.IDLE and m.sleep is None
    await m.prepare_for_sleep(True)
    assert len(armer.armed_with) == 2 and m.state == State.ARMED
    assert [ok for ok, _ in finished(bus)] == [True]


@pytest.mark.asyncio
async def test_prepare_for_sleep_false_after_the_record_reports_nothing_more(
    tmp_path: Path,
) -> None:
    armer = Armer()
    m, bus = manager(tmp_path, armer)
    await m.prepare_for_sleep(True)
    assert armer.on_finished is not None
    armer.on_finished(True, {"result": "success"})
    await m.prepare_for_sleep(False)
    assert armer.disarmed == 0
    assert [rec["result"] for _, rec in finished(bus)] == ["success"]
    assert not any(p.startswith("last-cycle:") for p in m.problems)


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("armer", "reason"),
    [
        (Armer(fail="the helper did not start"), "cannot arm the helper: the helper did not start"),
        (HangingArmer(), "cannot arm the helper: arming timed out after 0.3 s"),
    ],
)
async def test_an_arm_failure_is_reported_at_the_end_of_the_sleep(
    tmp_path: Path, armer: RecordingArmer, reason: str
) -> None:
    m, bus = manager(tmp_path, armer)
    r = hold_fake_inhibitor(m)
    await asyncio.wait_for(m.prepare_for_sleep(True), 10)
    assert closed(r) and m.state == State.IDLE
    assert m.sleep is not None and m.sleep.unprotected == reason
    if isinstance(armer, Armer):
        # Defect 7: the helper was stood down before logind could go on with the sleep.
        assert armer.lock_held_at_disarm == [True]
    await m.prepare_for_sleep(False)
    [(ok, rec)] = finished(bus)
    assert not ok and rec["reason"] == reason
    assert rec["problems"] == [sleep_report.NO_CYCLE]
    assert unprotected_line(m).endswith(reason)


@pytest.mark.asyncio
async def test_the_stock_fallback_of_the_sleep_entry_is_named(tmp_path: Path) -> None:
    m, bus = manager(tmp_path, Armer())
    await m.prepare_for_sleep(True)
    m.stock_trace.parent.mkdir(parents=True)
    m.stock_trace.write_text('{"reason": "the helper is not armed: no answer", "boottime": 1e9}')
    await m.prepare_for_sleep(False)
    [(_, rec)] = finished(bus)
    assert (
        rec["reason"]
        == "the sleep entry ran the stock systemd-sleep: the helper is not armed: no answer"
    )
    assert rec["slept"] is True
    assert not m.stock_trace.exists()


@pytest.mark.asyncio
async def test_protection_disabled_is_the_reason(tmp_path: Path) -> None:
    armer = Armer()
    m, bus = manager(tmp_path, armer)
    m.enabled = False
    await m.prepare_for_sleep(True)
    assert armer.armed_with == [] and m.state == State.IDLE
    await m.prepare_for_sleep(False)
    [(_, rec)] = finished(bus)
    assert rec["reason"] == "protection disabled"


@pytest.mark.asyncio
async def test_logind_gone_while_armed_ends_the_sleep(tmp_path: Path) -> None:
    # Its PrepareForSleep(false) will never come; the next PrepareForSleep(true) must arm.
    armer = Armer()
    m, bus = manager(tmp_path, armer)
    await m.prepare_for_sleep(True)
    await m.cycle.logind_restarted()
    assert armer.disarmed == 1 and m.state == State.IDLE
    [(_, rec)] = finished(bus)
    assert "logind left the bus" in rec["reason"]
    await m.prepare_for_sleep(True)
    assert len(armer.armed_with) == 2 and m.state == State.ARMED


@pytest.mark.asyncio
async def test_logind_gone_while_idle_changes_nothing(tmp_path: Path) -> None:
    armer = Armer()
    m, bus = manager(tmp_path, armer)
    await m.cycle.logind_restarted()
    assert armer.disarmed == 0 and finished(bus) == []


@pytest.mark.asyncio
async def test_the_deadline_ends_a_sleep_that_never_completes(tmp_path: Path) -> None:
    armer = Armer()
    m, bus = manager(tmp_path, armer, deadline=0.1)
    await m.prepare_for_sleep(True)
    await wait_until_async(lambda: m.state == State.IDLE, message="back to idle")
    [(_, rec)] = finished(bus)
    assert rec["reason"] == "the sleep had not ended 0.1 s after PrepareForSleep(true)"
    assert armer.disarmed == 1


@pytest.mark.asyncio
async def test_a_busy_helper_keeps_the_sleep_until_its_record(tmp_path: Path) -> None:
    # The end came (here: PrepareForSleep(false), then the deadline) while the helper still
    # runs its cycle: nothing is reported until its record, which is the truth.
    armer = Armer(busy=True)
    m, bus = manager(tmp_path, armer, deadline=0.05)
    await m.prepare_for_sleep(True)
    await m.prepare_for_sleep(False)
    await wait_until_async(lambda: armer.disarmed >= 3, message="the deadline tried again")
    assert m.state == State.ARMED and finished(bus) == []
    assert armer.on_finished is not None
    armer.on_finished(True, {"result": "success"})
    assert m.state == State.IDLE and m.sleep is None
    assert [rec["result"] for _, rec in finished(bus)] == ["success"]


@pytest.mark.asyncio
async def test_a_second_prepare_for_sleep_while_armed_arms_again(tmp_path: Path) -> None:
    armer = Armer()
    m, bus = manager(tmp_path, armer)
    await m.prepare_for_sleep(True)
    first = m.sleep
    await m.prepare_for_sleep(True)
    assert len(armer.armed_with) == 2 and m.state == State.ARMED
    assert m.sleep is not first and finished(bus) == []
    rights_asked: list[str] = []

    async def rights() -> int:
        rights_asked.append(":1.9")
        return 0

    with pytest.raises(Busy):
        await m.cycle.suspend(":1.9", rights)
    assert rights_asked == []  # refused before logind's rules are even asked


@pytest.mark.asyncio
async def test_a_second_prepare_for_sleep_after_an_unprotected_one_reports_it(
    tmp_path: Path,
) -> None:
    armer = Armer(fail="no helper")
    m, bus = manager(tmp_path, armer)
    await m.prepare_for_sleep(True)
    armer.fail = ""
    await m.prepare_for_sleep(True)
    [(_, rec)] = finished(bus)
    assert rec["reason"] == "cannot arm the helper: no helper"
    assert rec["problems"] == ["another sleep began before it ended"]
    assert m.state == State.ARMED


@pytest.mark.asyncio
async def test_a_sleep_under_way_at_start_is_armed_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Restarted while armed: logind's PreparingForSleep says a sleep is waiting for us.
    armer = Armer()
    m, _bus = manager(tmp_path, armer)

    async def preparing() -> bool:
        return True

    monkeypatch.setattr(m.logind, "preparing_for_sleep", preparing)
    await m.cycle.join_sleep()
    assert armer.armed_with == [("cryptroot",)] and m.state == State.ARMED
    await m.cycle.join_sleep()  # already under way: not armed twice
    assert len(armer.armed_with) == 1


@pytest.mark.asyncio
async def test_back_to_idle_takes_the_delay_lock_again(tmp_path: Path) -> None:
    armer = Armer()
    m, bus = manager(tmp_path, armer)
    await m.prepare_for_sleep(True)
    assert not m.logind.inhibitor_held
    taken: list[bool] = []

    async def take() -> None:
        taken.append(True)

    m.logind.take_inhibitor = take  # type: ignore[method-assign]
    assert armer.on_finished is not None
    armer.on_finished(True, {"result": "success"})
    await wait_until_async(lambda: taken, message="the lock taken again")
    assert isinstance(bus, FakeBus)


class HeldSystemd:
    """Service watchdogs behind a systemd that answers when the test says (or never)."""

    def __init__(self) -> None:
        self.asked = 0
        self.answer = asyncio.Event()

    async def disable(self) -> None:
        self.asked += 1
        await self.answer.wait()

    async def restore(self) -> None:
        pass


@pytest.mark.asyncio
async def test_a_systemd_that_does_not_answer_costs_the_watchdog_switch_not_the_arm(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from cryptlockd.daemon import sleep_cycle

    monkeypatch.setattr(sleep_cycle, "WATCHDOGS_SWITCH_TIMEOUT", 0.05)
    armer = Armer()
    m, _ = manager(tmp_path, armer)
    silent = HeldSystemd()
    m.service_watchdogs = silent  # type: ignore[assignment]
    await asyncio.wait_for(m.prepare_for_sleep(True), 5)
    assert silent.asked == 1 and len(armer.armed_with) == 1 and m.state == State.ARMED
    # The helper is told all the same, and freezes.
    assert armer.watchdogs_told == 1


@pytest.mark.asyncio
async def test_logind_goes_on_once_armed_and_the_helper_freezes_once_the_watchdogs_are_off(
    tmp_path: Path,
) -> None:
    # Issue 12: the watchdog switch (two calls to a busy PID 1) no longer holds logind;
    # the helper waits for watchdogs_off() before it freezes (session.wait_watchdogs).
    armer = Armer()
    m, _ = manager(tmp_path, armer)
    slow = HeldSystemd()
    m.service_watchdogs = slow  # type: ignore[assignment]
    task = asyncio.ensure_future(m.prepare_for_sleep(True))
    await wait_until_async(lambda: not m.logind.inhibitor_held, message="the lock released")
    assert m.state == State.ARMED and armer.watchdogs_told == 0 and not task.done()
    slow.answer.set()
    await asyncio.wait_for(task, 5)
    assert armer.watchdogs_told == 1


class LateArmer(Armer):
    """The helper says `armed` (on_armed) `after` seconds into the arm, and the arm itself
    never returns: the manager's timeout (0.3 s) ends it."""

    def __init__(self, after: float) -> None:
        super().__init__()
        self.after = after
        self.said_armed = False

    async def arm(
        self,
        devices: Sequence[LuksDevice],
        on_finished: CycleCallback,
        options: ArmOptions | None = None,
    ) -> None:
        on_armed = options.on_armed if options else None
        assert on_armed is not None
        self.on_finished = on_finished

        def say_armed() -> None:
            on_armed()
            self.said_armed = True

        asyncio.get_running_loop().call_later(self.after, say_armed)
        await asyncio.Event().wait()


@pytest.mark.asyncio
async def test_logind_goes_on_the_moment_the_helper_says_armed(tmp_path: Path) -> None:
    # Its `armed` came, and the arm's coroutine never got its turn before the timeout:
    # armed it is (the lock went at `armed`, not at the arm's return; issue 12).
    armer = LateArmer(after=0.05)
    m, _ = manager(tmp_path, armer)
    r = hold_fake_inhibitor(m)
    await asyncio.wait_for(m.prepare_for_sleep(True), 5)
    assert closed(r) and m.state == State.ARMED
    assert m.sleep is not None and m.sleep.unprotected == ""
    assert armer.disarmed == 0 and armer.watchdogs_told == 1


@pytest.mark.asyncio
async def test_an_armed_after_the_arm_was_given_up_lets_nothing_go(tmp_path: Path) -> None:
    # Defect 7 again: given up at 0.3 s, the helper stood down, the lock released as
    # "arming failed"; its `armed` at 0.5 s changes nothing.
    armer = LateArmer(after=0.5)
    m, _ = manager(tmp_path, armer)
    hold_fake_inhibitor(m)
    await asyncio.wait_for(m.prepare_for_sleep(True), 5)
    assert m.state == State.IDLE and armer.disarmed == 1
    assert m.sleep is not None and "timed out" in m.sleep.unprotected
    await wait_until_async(lambda: armer.said_armed, message="the late armed")
    assert m.state == State.IDLE
