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
        m.set_state(State.ARMING, evaluate=False)
        # Service watchdogs off before logind may go on, so PID 1 cannot kill a frozen
        # service during a long prompt; back_to_idle() restores them either way. Switched
        # while the helper arms (logind waits for both; issue 12) and awaited on every path
        # before the lock goes (no record can come before that: nothing sleeps yet).
        # Bounded, so that with the arm's own bound it stays inside logind's 5 s delay: a
        # systemd too slow to answer costs the watchdog switch, never the protection.
        switch = asyncio.ensure_future(self._watchdogs_off())
        timeout = m.arm_timeout
        try:
            await asyncio.wait_for(m.armer.arm(list(m.devices), m.cycle_finished), timeout)
        except Exception as e:
            await switch
            why = f"arming timed out after {timeout} s" if isinstance(e, TimeoutError) else str(e)
            sleep.unprotected = f"cannot arm the helper: {why}"
            log.critical(
                "this sleep is NOT protected, the LUKS keys stay in RAM: %s",
                sleep.unprotected,
                extra=event(MessageId.UNPROTECTED_SLEEP, REASON=why),
            )
            # Before logind may go on: a helper that armed just too late must not take
            # this sleep while we say it is unprotected (issue 10, defect 7). Should it
            # not confirm, it stands down once armed, or its record tells the truth.
            await self._disarm()
            m.logind.release_inhibitor("arming failed")
            if self.sleep is sleep:
                m.set_state(State.IDLE)
            return
        await switch
        # logind first, then the announcement (without the self-checks: set_state), which
        # now takes CPU from the way to the sleep, not from logind's wait (issue 12). No
        # await in between, so nothing (a record) can come before ARMED is set.
        m.logind.release_inhibitor("armed")
        m.set_state(State.ARMED, evaluate=False)
        seconds = time.monotonic() - t0
        log.info(
            "armed in %.3f s", seconds, extra=event(MessageId.ARMED, ARM_SECONDS=f"{seconds:.3f}")
        )

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
