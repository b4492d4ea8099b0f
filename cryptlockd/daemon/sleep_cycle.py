"""The daemon's side of one sleep, from PrepareForSleep(true) to its end (SPEC 2.2, 2.6, 2.8).

A sleep ends in exactly one of these ways, and every one leads to Manager.back_to_idle():
- the helper's cycle record (or the recovery's) arrives: Manager.cycle_finished;
- PrepareForSleep(false) comes without a record (hibernate and friends, a suspend that
  never reached our sleep entry, the entry's stock fallback);
- logind leaves the bus, or another process takes its name: the old logind's
  PrepareForSleep(false) will never come;
- the deadline passes (a sleep that never completes).
The last three stand the helper down first, unless it is running the cycle: then its record
ends the sleep, and the deadline starts again. A sleep without a record is reported as
unprotected (sleep_report.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

from cryptlockd.daemon import sleep_report
from cryptlockd.daemon.armer import ArmOptions
from cryptlockd.daemon.log import MessageId, event
from cryptlockd.daemon.sleep_report import SleepRequest
from cryptlockd.defs import DBUS_CALL_TIMEOUT, State
from cryptlockd.helper import protocol

if TYPE_CHECKING:
    from cryptlockd.daemon.manager import Manager

__all__ = ["SLEEP_DEADLINE", "SleepCycle"]

log = logging.getLogger("cryptlockd")

# A sleep that neither its record, nor PrepareForSleep(false), nor logind leaving the bus
# ends within this long is over (SPEC 2.8: the state cannot stay armed); an armed helper
# that no sleep came to stands down after 120 s (helper/server.py). The monotonic clock
# also runs while a cycle keeps us frozen: the helper is then busy, and the sleep goes on.
SLEEP_DEADLINE = 150.0
# Turning systemd's service watchdogs off before arming may take this long at most.
WATCHDOGS_SWITCH_TIMEOUT = 1.0


class SleepCycle:
    def __init__(self, manager: Manager, deadline: float = SLEEP_DEADLINE) -> None:
        self.m = manager
        self.deadline = deadline
        # From PrepareForSleep(true) until Manager.back_to_idle().
        self.sleep: SleepRequest | None = None
        self._timer: asyncio.TimerHandle | None = None

    def over(self) -> None:
        """Called by Manager.back_to_idle() only."""
        self._cancel_deadline()
        self.sleep = None

    async def suspend(
        self, sender: str | None, caller_rights: Callable[[], Awaitable[int]]
    ) -> None:
        """Suspend(), once polkit has said yes to org.cryptlockd1.suspend. `caller_rights`
        checks the caller against logind's rules and returns SuspendWithFlags()' flags."""
        self.m.may_sleep(sender)
        flags = await caller_rights()
        self.m.may_sleep(sender)  # again: a polkit dialog may have taken a while
        log.info(
            "suspend requested by %s",
            sender,
            extra=event(MessageId.SUSPEND_REQUESTED, SENDER=sender or ""),
        )
        await self.m.logind.suspend(flags)

    async def prepare_for_sleep(self, start: bool) -> None:
        log.info(
            "PrepareForSleep(%s)",
            "true" if start else "false",
            extra=event(MessageId.PREPARE_FOR_SLEEP, START=int(start)),
        )
        if self.m.state == State.LOCKED:
            # Lock() holds the helper (lock_cycle.py), and its record ends the lock: this
            # sleep is not ours to arm for (the sleep entry finds no free helper).
            log.warning("a sleep during a Lock(): not armed for")
            if start:
                self.m.logind.release_inhibitor("locked")
            else:
                await self.m.logind.ensure_inhibitor()
            return
        if start:
            self.m.notifier.suspend_watchdog()
            await self._sleep_requested()
        else:
            await self.m.logind.ensure_inhibitor()
            await self._end_sleep(sleep_report.NO_CYCLE, self.sleep)
            log.info("resumed", extra=event(MessageId.RESUMED))

    async def join_sleep(self) -> None:
        """At start: a sleep logind began before we ran (we were restarted while armed,
        say) is armed for now. A helper our predecessor armed is simply armed again."""
        if self.sleep is None and await self.m.logind.preparing_for_sleep():
            log.warning("a sleep is under way (logind's PreparingForSleep): arming for it")
            await self.prepare_for_sleep(True)

    async def logind_restarted(self) -> None:
        await self._end_sleep(
            "logind left the bus before the sleep ended: its PrepareForSleep(false) never came",
            self.sleep,
        )

    async def _sleep_requested(self) -> None:
        m = self.m
        if self.sleep is not None:
            # Its end was lost. An armed helper is armed again for this one; a sleep
            # nothing was armed for is reported now.
            log.warning("PrepareForSleep(true) before the last sleep ended (%s)", m.state.value)
            if m.state == State.IDLE:
                await self._end_sleep("another sleep began before it ended", self.sleep)
        t0 = time.monotonic()
        sleep = self.sleep = SleepRequest(protocol.boottime(), m.device_names())
        # The record's daemon steps (helper_messages.merge_record).
        steps = {"prepare_for_sleep": sleep.started}
        self._start_deadline(sleep)
        if not m.enabled or not m.devices:
            sleep.unprotected = "protection disabled" if not m.enabled else "no LUKS device"
            log.warning(
                "this sleep is NOT protected, the LUKS keys stay in RAM: %s",
                sleep.unprotected,
                extra=event(MessageId.UNPROTECTED_SLEEP, REASON=sleep.unprotected),
            )
            m.logind.release_inhibitor("sleeping unprotected")
            return
        if not m.protected:
            # Arm anyway: the armer may still manage (or records, under test); whatever
            # fails is logged there, and the sleep entry falls back to a plain sleep.
            log.warning("arming although checks fail: %s", "; ".join(m.problems))
        released = given_up = False

        def armed() -> None:
            # The moment the helper says `armed` (the armer calls this from its reader):
            # logind goes on at once, not once the event loop, busy with the bus around a
            # sleep, gets back to this coroutine (26-69 ms under TCG, issue 12). The
            # announcement comes after, and with it: no record can come before ARMED.
            nonlocal released
            if given_up or released:
                return
            released = True
            m.logind.release_inhibitor("armed", refresh=False)
            steps["delay_lock_released"] = protocol.boottime()
            m.set_state(State.ARMED, evaluate=False)

        arming = asyncio.ensure_future(
            m.armer.arm(
                list(m.devices),
                m.cycle_finished,
                ArmOptions(steps=steps, watchdogs_pending=True, on_armed=armed),
            )
        )
        # Service watchdogs off before anything is frozen, so PID 1 cannot kill a frozen
        # service during a long prompt; back_to_idle() restores them either way. Switched
        # while the helper arms (started after the arm, which goes first), but logind does
        # not wait for it: two calls to a PID 1 busy with the sleep took 30-130 ms past
        # the arm under TCG (issue 12). The helper freezes nothing before our
        # watchdogs_off() (or a few seconds), sent once the switch is over. Bounded: a
        # systemd too slow to answer costs the watchdog switch, never the protection.
        # Awaited here, in logind's serial order, so the restore that back_to_idle()
        # queues always comes after it.
        # One turn of the loop: the arm's task starts first (its connect, the sleep-state
        # read), then the announcement, which is not on logind's way (issue 12). `armed`
        # needs the helper's answer, so it can only come after this.
        await asyncio.sleep(0)
        m.set_state(State.ARMING, evaluate=False)
        switch = asyncio.ensure_future(self._watchdogs_off())
        timeout = m.arm_timeout
        try:
            await asyncio.wait_for(arming, timeout)
        except Exception as e:
            if not released:
                given_up = True  # before any await: a late `armed` must not release
                await self._arm_failed(sleep, e, timeout, switch)
                return
            # `armed` came just as the arm timed out: armed it is.
        armed()  # when the armer did not call it
        seconds = time.monotonic() - t0
        log.info(
            "armed in %.3f s", seconds, extra=event(MessageId.ARMED, ARM_SECONDS=f"{seconds:.3f}")
        )
        await switch
        steps["watchdogs_switched"] = protocol.boottime()
        await m.armer.watchdogs_off()

    async def _arm_failed(
        self,
        sleep: SleepRequest,
        e: Exception,
        timeout: float,
        switch: asyncio.Future[None],
    ) -> None:
        m = self.m
        await switch
        why = f"arming timed out after {timeout} s" if isinstance(e, TimeoutError) else str(e)
        sleep.unprotected = f"cannot arm the helper: {why}"
        log.critical(
            "this sleep is NOT protected, the LUKS keys stay in RAM: %s",
            sleep.unprotected,
            extra=event(MessageId.UNPROTECTED_SLEEP, REASON=why),
        )
        # Before logind may go on: a helper that armed just too late must not take this
        # sleep while we say it is unprotected (issue 10, defect 7). Should it not
        # confirm, it stands down once armed, or its record tells the truth.
        await self._disarm()
        m.logind.release_inhibitor("arming failed")
        if self.sleep is sleep:
            m.set_state(State.IDLE)

    async def _watchdogs_off(self) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.m.service_watchdogs.disable(), WATCHDOGS_SWITCH_TIMEOUT)

    async def _end_sleep(self, why: str, sleep: SleepRequest | None) -> None:
        """`sleep` is over without its record: the helper stands down and the sleep is
        reported unprotected. Unless the helper is busy with its cycle: its record ends it."""
        if sleep is None or self.sleep is not sleep or self.m.state == State.LOCKED:
            return  # over already, or a Lock(): its own ends (lock_cycle.py)
        if not await self._disarm():
            log.info("the helper is still busy with this sleep: its record will end it")
            self._start_deadline(sleep)
            return
        if self.sleep is not sleep:
            return  # its record came meanwhile
        trace = sleep_report.take_stock_trace(str(self.m.stock_trace))
        record = sleep_report.unprotected_record(sleep, protocol.boottime(), why, trace)
        log.warning(
            "this sleep was NOT protected: %s",
            record["reason"],
            extra=event(MessageId.UNPROTECTED_SLEEP, REASON=record["reason"]),
        )
        self.m.back_to_idle(False, record)

    async def _disarm(self) -> bool:
        """The armer's disarm(), bounded: False while the helper runs a cycle."""
        try:
            return await asyncio.wait_for(self.m.armer.disarm(), DBUS_CALL_TIMEOUT)
        except Exception as e:
            log.error("disarming the helper failed: %s", e)
            return True

    def _start_deadline(self, sleep: SleepRequest) -> None:
        self._cancel_deadline()
        why = f"the sleep had not ended {self.deadline:g} s after PrepareForSleep(true)"
        self._timer = asyncio.get_running_loop().call_later(
            self.deadline, lambda: self.m.logind.serially(self._end_sleep(why, sleep))
        )

    def _cancel_deadline(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
