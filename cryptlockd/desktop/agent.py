"""cryptlockd-notify's I/O: the daemon's public API on the system bus in, desktop
notifications on the session bus out. What to say is messages.py's job.

It reads Protected, Problems and CycleFinished, and nothing it handles is a secret. Signals
count only from the current owner of org.cryptlockd1 (anyone may send a CycleFinished
straight to our unique name), as for `cryptlockctl monitor`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

from dbus_fast import Message, Variant
from dbus_fast.aio import MessageBus

from cryptlockd import bus
from cryptlockd.cli.client import MATCH_RULES
from cryptlockd.cli.output import plain
from cryptlockd.cli.signals import (
    CycleFinished,
    OwnerChanged,
    PropertiesChanged,
    daemon_signal,
    owner_change,
)
from cryptlockd.defs import (
    BUS_NAME,
    DBUS_CALL_TIMEOUT,
    DBUS_NAME,
    ERR_NAME_HAS_NO_OWNER,
    MANAGER_INTERFACE,
    NOTIFICATIONS_BUS_NAME,
    NOTIFICATIONS_INTERFACE,
    NOTIFICATIONS_PATH,
    OBJECT_PATH,
    PROPERTIES_INTERFACE,
)
from cryptlockd.desktop.messages import Notice, ProtectionWatch, Urgency, cycle_notice
from cryptlockd.errors import RemoteError

__all__ = ["APP_NAME", "DaemonWatch", "Notifier"]

log = logging.getLogger(__name__)

APP_NAME = "cryptlockd"
# Notify may start the server through D-Bus activation first.
NOTIFY_TIMEOUT = 25.0
# A server that is there but failed a call gets another try this often; one that is not
# there is tried again as soon as it takes its name.
RETRY_SECONDS = 60.0
# Notices waiting for a server; beyond this the newest are dropped (and logged).
MAX_PENDING = 20
ICONS = {Urgency.CRITICAL: "dialog-warning", Urgency.NORMAL: "security-high"}

SERVER_MATCH = (
    f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_NAME}',member='NameOwnerChanged',"
    f"arg0='{NOTIFICATIONS_BUS_NAME}'"
)


class Notifier:
    """Shows notices through org.freedesktop.Notifications on the session bus, one at a
    time and in order. Without a server, a notice waits until one takes the name."""

    def __init__(self, session: MessageBus) -> None:
        self.session = session
        self.queue: asyncio.Queue[Notice] = asyncio.Queue(MAX_PENDING)
        self.server_appeared = asyncio.Event()
        self.server = bus.RemoteInterface(
            session, NOTIFICATIONS_BUS_NAME, NOTIFICATIONS_PATH, NOTIFICATIONS_INTERFACE,
            NOTIFY_TIMEOUT,
        )  # fmt: skip

    async def start(self) -> asyncio.Task[None]:
        self.session.add_message_handler(self._on_message)
        await bus.add_match(self.session, SERVER_MATCH, DBUS_CALL_TIMEOUT)
        return asyncio.get_running_loop().create_task(self._deliver())

    def show(self, notice: Notice) -> None:
        # In the user's journal even when no server shows it (or one shows it late).
        log.info("notice: %s", notice.summary)
        try:
            self.queue.put_nowait(notice)
        except asyncio.QueueFull:
            log.warning("no notification server; dropped: %s", notice.summary)

    def _on_message(self, msg: Message) -> None:
        if owner_change(msg, NOTIFICATIONS_BUS_NAME):
            log.info("a notification server appeared on the session bus")
            self.server_appeared.set()

    async def _deliver(self) -> None:
        while True:
            notice = await self.queue.get()
            # Cleared before each try, so a server that appears during it is not missed.
            self.server_appeared.clear()
            while not await self._notify(notice):
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.server_appeared.wait(), RETRY_SECONDS)
                self.server_appeared.clear()

    async def _notify(self, notice: Notice) -> bool:
        hints = {
            "urgency": Variant("y", int(notice.urgency)),
            "desktop-entry": Variant("s", "cryptlockd-notify"),
        }
        body = [
            APP_NAME, 0, ICONS.get(notice.urgency, ""), notice.summary, notice.body, [], hints, -1,
        ]  # fmt: skip
        try:
            reply = await self.server.call("Notify", "susssasa{sv}i", body)
        except RemoteError as e:
            log.warning("cannot show %r yet, waiting for a notification server: %s",
                        notice.summary, e)  # fmt: skip
            return False
        log.info("shown (id %s): %s", reply.body[0] if reply.body else "?", notice.summary)
        return True


class DaemonWatch:
    """Follows org.cryptlockd1 on the system bus: its owner, its Protected and Problems
    properties (read again whenever the daemon (re)appears), its CycleFinished."""

    def __init__(self, system: MessageBus, notifier: Notifier) -> None:
        self.system = system
        self.notifier = notifier
        self.protection = ProtectionWatch()
        self.owner = ""
        self.properties: dict[str, Any] = {}
        self._refresh: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self.system.add_message_handler(self._on_message)
        for rule in MATCH_RULES:
            await bus.add_match(self.system, rule, DBUS_CALL_TIMEOUT)
        # Asked after matching, so that no change of owner falls in between.
        try:
            reply = await bus.bus_daemon(self.system, DBUS_CALL_TIMEOUT).call(
                "GetNameOwner", "s", [BUS_NAME]
            )
            self._owner_changed(str(reply.body[0]))
        except RemoteError as e:
            if e.error_name != ERR_NAME_HAS_NO_OWNER:
                raise
            log.info("cryptlockd is not running; waiting for it")

    def _owner_changed(self, owner: str) -> None:
        self.owner = owner
        self.properties = {}
        if self._refresh is not None:
            self._refresh.cancel()
            self._refresh = None
        if owner:
            log.info("cryptlockd is on the system bus (%s)", owner)
            self._refresh = asyncio.get_running_loop().create_task(self._read_properties(owner))
        else:
            log.info("cryptlockd left the system bus")

    async def _read_properties(self, owner: str) -> None:
        remote = bus.RemoteInterface(
            self.system, owner, OBJECT_PATH, PROPERTIES_INTERFACE, DBUS_CALL_TIMEOUT
        )
        try:
            reply = await remote.call("GetAll", "s", [MANAGER_INTERFACE])
        except RemoteError as e:
            log.warning("cannot read cryptlockd's properties: %s", e)
            return
        if owner == self.owner:
            self._changed(plain(reply.body[0]))

    def _changed(self, changed: dict[str, Any]) -> None:
        self.properties.update(changed)
        if "Protected" in changed or "Problems" in changed:
            problems: Sequence[str] = self.properties.get("Problems") or []
            notice = self.protection.update(bool(self.properties.get("Protected")), problems)
            if notice is not None:
                self.notifier.show(notice)

    def _on_message(self, msg: Message) -> None:
        match daemon_signal(msg, self.owner):
            case OwnerChanged(owner):
                self._owner_changed(owner)
            case PropertiesChanged(changed, _):
                self._changed(changed)
            case CycleFinished(success, record):
                self.notifier.show(cycle_notice(success, record))
            case None:
                pass
