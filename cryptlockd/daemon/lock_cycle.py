"""Lock() (issue 14): the protected cycle without the sleep, for a user who walks away from a
running machine. Freeze, suspend the devices, verify, prompt on the VT, resume, thaw: the
helper runs its cycle as for a sleep, armed with `sleeps` false, and the daemon begins it
and follows it in the sleep entry's stead (lock_entry.py). No system-sleep hooks run.

A lock is a sleep to the rest of the daemon: it takes the manager's sleep slot, so that
Suspend(), Lock() and logind's PrepareForSleep find it busy (State "locked"), and it ends,
whichever way, in Manager.back_to_idle with a record whose "action" is "lock":
- the helper's record (or the recovery's) arrives: the usual end;
- arming or beginning fails: nothing was frozen or suspended, the helper stands down, and
  the record says why (Lock() fails with LockFailed);
- the helper ends the cycle but its record never comes: a failed record, after RECORD_WAIT.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from cryptlockd.daemon import sleep_report
from cryptlockd.daemon.armer import ArmOptions, CycleEntry, CycleRecord
from cryptlockd.daemon.log import MessageId, event
from cryptlockd.daemon.sleep_cycle import WATCHDOGS_SWITCH_TIMEOUT
from cryptlockd.daemon.sleep_report import SleepRequest
from cryptlockd.defs import DBUS_CALL_TIMEOUT, State
from cryptlockd.errors import LockFailed
from cryptlockd.helper import protocol

if TYPE_CHECKING:
    from cryptlockd.daemon.manager import Manager

__all__ = ["LOCK", "LockCycle", "lock_failed_record"]

log = logging.getLogger("cryptlockd")

LOCK = "lock"
# `begin` is answered once the helper has switched to its VT.
BEGIN_TIMEOUT = 10.0
# The record follows `done` on the other connection at once; this is for a helper that
# ended the cycle and died before it sent it (the recovery's record comes sooner).
RECORD_WAIT = 10.0


def lock_failed_record(lock: SleepRequest, ended: float, why: str) -> CycleRecord:
    """A lock that never reached the helper's cycle, or whose record was lost. Pure."""
    record = sleep_report.unprotected_record(lock, ended, why, None)
    record["result"] = "failed"
    record["action"] = LOCK
    return record


class LockCycle:
    def __init__(self, manager: Manager) -> None:
        self.m = manager
        self._task: asyncio.Task[None] | None = None
        self._recorded = asyncio.Event()

    async def lock(self, sender: str | None) -> None:
        """Lock(), once polkit has said yes to org.cryptlockd1.lock: returns once the
        helper runs the cycle (on its VT, about to freeze). Raises Busy or NotProtected
        (nothing changed), or LockFailed (the lock is over, and LastCycle says why)."""
        m = self.m
        m.may_sleep(sender)
        log.info(
            "lock requested by %s",
            sender,
            extra=event(MessageId.LOCK_REQUESTED, SENDER=sender or ""),
        )
        lock = SleepRequest(protocol.boottime(), m.device_names())
        # From here until back_to_idle(), a sleep to everyone else (SleepCycle.over() ends it).
        m.cycle.sleep = lock
        self._recorded.clear()
        m.notifier.suspend_watchdog()
        m.set_state(State.LOCKED)
        # As for a sleep (sleep_cycle.py): frozen services must outlive a long prompt.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(m.service_watchdogs.disable(), WATCHDOGS_SWITCH_TIMEOUT)
        entry = m.armer.entry()
        try:
            await asyncio.wait_for(
                m.armer.arm(list(m.devices), self._finished, ArmOptions(sleeps=False)),
                m.arm_timeout,
            )
            await entry.begin(BEGIN_TIMEOUT)
        except Exception as e:
            why = f"arming timed out after {m.arm_timeout} s" if isinstance(e, TimeoutError) else e
            await self._give_up(lock, f"cannot lock: {why}")
            raise LockFailed(f"cannot lock: {why}") from e
        self._task = asyncio.get_running_loop().create_task(self._follow(lock, entry))

    def _finished(self, success: bool, record: CycleRecord) -> None:
        """The helper's record, or the recovery's."""
        self._recorded.set()
        self.m.cycle_finished(success, {**record, "action": LOCK})

    async def _follow(self, lock: SleepRequest, entry: CycleEntry) -> None:
        why = await entry.run({"lock_requested": lock.started})
        if why:
            log.warning("the lock's cycle: %s", why)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._recorded.wait(), RECORD_WAIT)
        if self.m.sleep is lock:
            self._end(lock, f"the helper's record of the lock never came ({why or 'no reason'})")

    async def _give_up(self, lock: SleepRequest, why: str) -> None:
        log.error("%s; the keys stay in RAM", why)
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.m.armer.disarm(), DBUS_CALL_TIMEOUT)
        if self.m.sleep is lock:
            self._end(lock, why)

    def _end(self, lock: SleepRequest, why: str) -> None:
        self.m.back_to_idle(False, lock_failed_record(lock, protocol.boottime(), why))
