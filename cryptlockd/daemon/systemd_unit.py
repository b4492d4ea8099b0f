"""One systemd unit through systemd's D-Bus API, on the daemon's own connection: start and
stop it, read its ActiveState, and wait until systemd says that state changed.

systemd sends a unit's PropertiesChanged on the system bus only while some client has
called Subscribe(), so watching a unit subscribes us (systemd drops the subscription when
our connection closes).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Collection

from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from cryptlockd.bus import RemoteInterface, add_match
from cryptlockd.defs import (
    DBUS_CALL_TIMEOUT,
    PROPERTIES_INTERFACE,
    SYSTEMD_BUS_NAME,
    SYSTEMD_ERROR_ALREADY_SUBSCRIBED,
    SYSTEMD_ERROR_NO_SUCH_UNIT,
    SYSTEMD_MANAGER_INTERFACE,
    SYSTEMD_PATH,
    SYSTEMD_SERVICE_INTERFACE,
    SYSTEMD_UNIT_INTERFACE,
)
from cryptlockd.errors import RemoteError

__all__ = ["SystemdUnit"]

log = logging.getLogger(__name__)


class SystemdUnit:
    def __init__(self, bus: MessageBus, name: str, timeout: float = DBUS_CALL_TIMEOUT) -> None:
        self.name = name
        self._bus = bus
        self._timeout = timeout
        self._systemd = RemoteInterface(
            bus, SYSTEMD_BUS_NAME, SYSTEMD_PATH, SYSTEMD_MANAGER_INTERFACE, timeout
        )
        self._watched: str | None = None  # the unit's object path, once we watch it
        self._watch_lock = asyncio.Lock()
        self._changed = asyncio.Event()

    async def start(self) -> None:
        await self._systemd.call("StartUnit", "ss", [self.name, "replace"])

    async def stop(self) -> None:
        await self._systemd.call("StopUnit", "ss", [self.name, "replace"])

    def next_change(self) -> asyncio.Event:
        """An event set when systemd next reports a change of the unit. Take it before
        reading the state, so a change in between is not missed."""
        return self._changed

    async def active_state(self) -> str:
        """The unit's ActiveState; "inactive" when systemd has not loaded it."""
        try:
            reply = await self._systemd.call("GetUnit", "s", [self.name])
        except RemoteError as e:
            if e.error_name == SYSTEMD_ERROR_NO_SUCH_UNIT:
                return "inactive"
            raise
        path = str(reply.body[0])
        await self._watch(path)
        unit = RemoteInterface(
            self._bus, SYSTEMD_BUS_NAME, path, SYSTEMD_UNIT_INTERFACE, self._timeout
        )
        return str(await unit.get("ActiveState"))

    async def exec_start(self) -> list[list[str]]:
        """The argv of each command of the service's effective ExecStart=, drop-ins
        applied, as systemd has loaded it (a(sasbttttuii): path, argv, ...)."""
        reply = await self._systemd.call("LoadUnit", "s", [self.name])
        service = RemoteInterface(
            self._bus,
            SYSTEMD_BUS_NAME,
            str(reply.body[0]),
            SYSTEMD_SERVICE_INTERFACE,
            self._timeout,
        )
        return [[str(a) for a in command[1]] for command in await service.get("ExecStart")]

    async def on_reload(self, callback: Callable[[], None]) -> None:
        """`callback()` after each daemon-reload of systemd (its Reloading(false) signal,
        which systemd sends while somebody is subscribed): the unit's properties may
        have changed (a drop-in added)."""

        def handle(msg: Message) -> None:
            if (
                msg.message_type == MessageType.SIGNAL
                and msg.member == "Reloading"
                and msg.interface == SYSTEMD_MANAGER_INTERFACE
                and msg.signature == "b"
                and not msg.body[0]
            ):
                callback()

        await add_match(
            self._bus,
            f"type='signal',sender='{SYSTEMD_BUS_NAME}',interface='{SYSTEMD_MANAGER_INTERFACE}',"
            "member='Reloading'",
            self._timeout,
        )
        self._bus.add_message_handler(handle)
        await self._subscribe()

    async def _subscribe(self) -> None:
        try:
            await self._systemd.call("Subscribe")
        except RemoteError as e:
            if e.error_name != SYSTEMD_ERROR_ALREADY_SUBSCRIBED:
                log.warning("cannot subscribe to systemd's signals: %s", e)

    async def wait_while(self, states: Collection[str], deadline: float) -> str:
        """Wait until the unit's ActiveState is none of `states`, or until `deadline`
        (time.monotonic()) passes. Returns the state last read."""
        while True:
            changed = self.next_change()
            state = await self.active_state()
            left = deadline - time.monotonic()
            if state not in states or left <= 0:
                return state
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), left)

    async def _watch(self, path: str) -> None:
        # Done before the state is read, so that no change falls in between.
        async with self._watch_lock:
            if self._watched == path:
                return
            try:
                await add_match(
                    self._bus,
                    f"type='signal',sender='{SYSTEMD_BUS_NAME}',"
                    f"interface='{PROPERTIES_INTERFACE}',member='PropertiesChanged',"
                    f"path='{path}'",
                    self._timeout,
                )
            except RemoteError as e:
                log.warning("cannot watch %s (waits on it run to their deadline): %s", self.name, e)
                return
            await self._subscribe()
            if self._watched is None:
                self._bus.add_message_handler(self._handle)
            self._watched = path

    def _handle(self, msg: Message) -> None:
        if (
            msg.message_type == MessageType.SIGNAL
            and msg.member == "PropertiesChanged"
            and msg.interface == PROPERTIES_INTERFACE
            and msg.path == self._watched
        ):
            # Whoever sent it, the waiters only read the state again.
            changed, self._changed = self._changed, asyncio.Event()
            changed.set()
