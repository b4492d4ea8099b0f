"""logind: the delay inhibitor, PrepareForSleep, and Suspend().

Any local user can send a signal that looks like logind's PrepareForSleep on the system
bus, so we track the unique name that owns org.freedesktop.login1 and compare each
signal's sender with it ourselves, in code, rather than trusting a match rule.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from cryptlockd.bus import RemoteInterface, bus_daemon
from cryptlockd.daemon.log import MessageId, event
from cryptlockd.defs import (
    DBUS_NAME,
    ERR_ACCESS_DENIED,
    LOGIND_BUS_NAME,
    LOGIND_ERROR_BLOCKED_BY_INHIBITOR,
    LOGIND_MANAGER_INTERFACE,
    LOGIND_PATH,
    LOGIND_ROOT_CHECK_INHIBITORS,
)
from cryptlockd.errors import Inhibited, LogindError, RemoteError

log = logging.getLogger(__name__)

INHIBIT_WHY = "Wipe the LUKS volume keys from RAM before the system sleeps"


class Logind:
    def __init__(
        self,
        bus: MessageBus,
        *,
        on_prepare_for_sleep: Callable[[bool], Awaitable[None]],
        on_change: Callable[[], None],
        on_owner_change: Callable[[], Awaitable[None]],
        timeout: float,
    ) -> None:
        self._bus = bus
        self._dbus = bus_daemon(bus, timeout)
        self._login1 = RemoteInterface(
            bus, LOGIND_BUS_NAME, LOGIND_PATH, LOGIND_MANAGER_INTERFACE, timeout
        )
        self._on_prepare_for_sleep, self._on_change = on_prepare_for_sleep, on_change
        self._on_owner_change = on_owner_change
        self.owner: str | None = None
        self.inhibitor_fd: int | None = None
        self.delay_max_usec: int | None = None
        # Signals are handled one at a time, in arrival order: a PrepareForSleep(false)
        # must not overtake the PrepareForSleep(true) before it.
        self._serial = asyncio.Lock()
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def inhibitor_held(self) -> bool:
        return self.inhibitor_fd is not None

    async def start(self) -> None:
        # Subscribe before asking for the owner, so no owner change falls in between.
        self._bus.add_message_handler(self._handle)
        for rule in (
            f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_NAME}',"
            f"member='NameOwnerChanged',arg0='{LOGIND_BUS_NAME}'",
            # Deliberately no sender= here: forged signals reach us and are refused (and
            # logged) by the explicit check in _handle.
            f"type='signal',interface='{LOGIND_MANAGER_INTERFACE}',"
            f"member='PrepareForSleep',path='{LOGIND_PATH}'",
        ):
            await self._dbus.call("AddMatch", "s", [rule])
        try:
            reply = await self._dbus.call("GetNameOwner", "s", [LOGIND_BUS_NAME])
            owner = str(reply.body[0])
        except RemoteError as e:
            log.warning("logind is not on the bus: %s", e)
            owner = None
        # Under the same lock as the NameOwnerChanged handler, so a change that arrives
        # while we act on this answer is applied after it, not interleaved with it.
        async with self._serial:
            await self._set_owner(owner)

    def stop(self) -> None:
        self._bus.remove_message_handler(self._handle)
        self.release_inhibitor("daemon stopping")

    # --- the inhibitor -------------------------------------------------------------

    async def ensure_inhibitor(self) -> None:
        if not self.inhibitor_held:
            await self.take_inhibitor()

    async def take_inhibitor(self) -> None:
        if self.owner is None:
            return
        try:
            reply = await self._login1.call(
                "Inhibit", "ssss", ["sleep", "cryptlockd", INHIBIT_WHY, "delay"]
            )
            fd = self._fd_from(reply)
        except (RemoteError, LogindError) as e:
            log.error(
                "cannot take the logind delay inhibitor: %s",
                e,
                extra=event(MessageId.INHIBITOR_FAILED),
            )
            self._on_change()
            return
        self.release_inhibitor("replaced")
        self.inhibitor_fd = fd
        log.info(
            "took the logind delay inhibitor (fd %d)",
            fd,
            extra=event(MessageId.INHIBITOR_TAKEN, LOGIND_OWNER=self.owner),
        )
        self._on_change()

    @staticmethod
    def _fd_from(reply: Message) -> int:
        fds = list(reply.unix_fds)
        if reply.signature != "h" or not fds:
            for fd in fds:
                os.close(fd)
            raise LogindError("Inhibit returned no file descriptor (was fd passing negotiated?)")
        index = reply.body[0]
        if not isinstance(index, int) or not 0 <= index < len(fds):
            index = 0
        fd = fds.pop(index)
        for other in fds:
            os.close(other)
        os.set_inheritable(fd, False)
        return fd

    def release_inhibitor(self, why: str, *, refresh: bool = True) -> None:
        """refresh=False: no re-evaluation of the self-checks (the caller announces the
        change itself): at the arm, they would take the CPU the sleep needs (issue 12)."""
        fd, self.inhibitor_fd = self.inhibitor_fd, None
        if fd is None:
            return
        try:
            os.close(fd)
        except OSError as e:
            log.warning("closing the inhibitor fd %d: %s", fd, e)
        log.info(
            "released the logind delay inhibitor: %s",
            why,
            extra=event(MessageId.INHIBITOR_RELEASED, REASON=why),
        )
        if refresh:
            self._on_change()

    async def _read_delay_max(self) -> None:
        try:
            self.delay_max_usec = int(await self._login1.get("InhibitDelayMaxUSec"))
            log.info("logind allows delay inhibitors %.1f s", self.delay_max_usec / 1e6)
        except (RemoteError, TypeError, ValueError) as e:
            self.delay_max_usec = None
            log.info("cannot read InhibitDelayMaxUSec: %s", e)

    async def preparing_for_sleep(self) -> bool:
        """logind's PreparingForSleep: a sleep is under way (between PrepareForSleep(true)
        and (false)); at our start, one we did not see begin. False when unknown."""
        if self.owner is None:
            return False
        try:
            return bool(await self._login1.get("PreparingForSleep"))
        except RemoteError as e:
            log.info("cannot read PreparingForSleep: %s", e)
            return False

    # --- signals -------------------------------------------------------------------

    async def _set_owner(self, owner: str | None) -> None:
        if owner == self.owner:
            return
        old, self.owner = self.owner, owner
        log.info(
            "org.freedesktop.login1 owner: %s -> %s",
            old or "(none)",
            owner or "(none)",
            extra=event(MessageId.LOGIND_OWNER_CHANGED, OLD_OWNER=old or "", NEW_OWNER=owner or ""),
        )
        # An inhibitor held with a logind that went away protects nothing.
        self.release_inhibitor("logind went away" if owner is None else "logind restarted")
        if owner is not None:
            await self.take_inhibitor()
            await self._read_delay_max()
        self._on_change()
        if old is not None:
            # The old logind's PrepareForSleep(false) will never come.
            await self._on_owner_change()

    def serially(self, coro: Awaitable[None]) -> None:
        """Runs `coro` after every logind event (and everything else handed in here)
        before it, and before those after it."""

        async def serially() -> None:
            async with self._serial:
                try:
                    await coro
                except Exception:
                    log.exception("handling a logind event failed")

        task = asyncio.get_running_loop().create_task(serially())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _handle(self, msg: Message) -> bool | None:
        if msg.message_type != MessageType.SIGNAL:
            return None
        if (
            msg.member == "NameOwnerChanged"
            and msg.interface == DBUS_NAME
            and msg.sender == DBUS_NAME
            and msg.signature == "sss"
            and msg.body[0] == LOGIND_BUS_NAME
        ):
            self.serially(self._set_owner(msg.body[2] or None))
        elif (
            msg.member == "PrepareForSleep"
            and msg.interface == LOGIND_MANAGER_INTERFACE
            and msg.path == LOGIND_PATH
        ):
            if self.owner is None or msg.sender != self.owner:
                log.warning(
                    "ignored a PrepareForSleep from %s, which is not logind (%s)",
                    msg.sender,
                    self.owner or "not on the bus",
                    extra=event(MessageId.FORGED_SIGNAL, SENDER=msg.sender or ""),
                )
                return None
            if msg.signature != "b":
                log.warning("ignored PrepareForSleep with signature %r", msg.signature)
                return None
            self.serially(self._on_prepare_for_sleep(bool(msg.body[0])))
        return None

    # --- methods -------------------------------------------------------------------

    async def suspend(self, flags: int = LOGIND_ROOT_CHECK_INHIBITORS) -> None:
        """SuspendWithFlags(): with SD_LOGIND_ROOT_CHECK_INHIBITORS, logind applies block
        inhibitors to us, root, too (suspend_rights.py has checked the caller already)."""
        try:
            await self._login1.call("SuspendWithFlags", "t", [flags])
        except RemoteError as e:
            if e.error_name == LOGIND_ERROR_BLOCKED_BY_INHIBITOR or (
                e.error_name == ERR_ACCESS_DENIED and "inhibitor" in e.text
            ):
                # One taken since the caller was checked: logind does not say whose.
                raise Inhibited(f"logind refused: {e.text}") from e
            raise LogindError(f"logind refused to suspend: {e}") from e
