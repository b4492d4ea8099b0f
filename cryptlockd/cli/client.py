"""cryptlockctl's one D-Bus client: it owns the connection, makes every call through
`cryptlockd.bus.call`, and turns a failed call into the one line the user sees."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from dbus_fast import BusType, DBusError, Message, MessageFlag, Variant
from dbus_fast.aio import MessageBus
from dbus_fast.introspection import Method, Node

from cryptlockd import bus
from cryptlockd.defs import (
    BUS_NAME,
    DBUS_NAME,
    DBUS_PATH,
    ERR_DISCONNECTED,
    ERR_NAME_HAS_NO_OWNER,
    ERR_SERVICE_UNKNOWN,
    ERR_SPAWN_PREFIX,
    ERR_TIMEOUT,
    INTROSPECTION_XML,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    PROPERTIES_INTERFACE,
)
from cryptlockd.errors import RemoteError

__all__ = ["NOT_RUNNING", "PRIVILEGED_TIMEOUT", "READ_TIMEOUT", "Client", "CtlError"]

# Reads answer at once; privileged calls wait for polkit (which may ask for a password)
# and, for Suspend, for logind.
READ_TIMEOUT = 10.0
PRIVILEGED_TIMEOUT = 60.0

NOT_RUNNING = f"cryptlockd is not running ({BUS_NAME} has no owner on the system bus)"

# What `monitor` listens to: the daemon's two signals, and its name changing hands.
MATCH_RULES = (
    f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
    f"interface='{PROPERTIES_INTERFACE}',member='PropertiesChanged',arg0='{MANAGER_INTERFACE}'",
    f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
    f"interface='{MANAGER_INTERFACE}',member='CycleFinished'",
    f"type='signal',sender='{DBUS_NAME}',interface='{DBUS_NAME}',member='NameOwnerChanged',"
    f"arg0='{BUS_NAME}'",
)


class CtlError(Exception):
    """One readable line for stderr; exit status 1."""


def ctl_error(what: str, e: RemoteError, timeout: float) -> CtlError:
    """The line a failed call `what` shows: the one translation of D-Bus errors."""
    if e.error_name in (ERR_SERVICE_UNKNOWN, ERR_NAME_HAS_NO_OWNER):
        return CtlError(NOT_RUNNING)
    if e.error_name.startswith(ERR_SPAWN_PREFIX):
        return CtlError(
            f"cryptlockd is not running and could not be started: {e.text} ({e.error_name})"
        )
    if e.error_name == ERR_TIMEOUT:
        return CtlError(f"{what}: no answer from cryptlockd within {timeout:g} s")
    if e.error_name == ERR_DISCONNECTED:
        return CtlError(f"{what}: lost the connection to the system bus: {e.text}")
    text = " ".join(e.text.split())  # one line, whatever the daemon sent
    return CtlError(f"{what} failed: {e.error_name}: {text}")


class Client:
    """The one owner of the bus connection; every call has a deadline, and the replies
    are checked against the introspection XML we ship."""

    def __init__(self, connection: MessageBus, timeout: float | None) -> None:
        self._bus = connection
        self.timeout = timeout
        [iface] = [
            i
            for i in Node.parse(INTROSPECTION_XML.read_text()).interfaces
            if i.name == MANAGER_INTERFACE
        ]
        self.xml_properties = {p.name: p.signature for p in iface.properties}
        self.xml_methods: dict[str, Method] = {m.name: m for m in iface.methods}

    @classmethod
    async def connect(cls, timeout: float | None) -> Client:
        try:
            connection = await asyncio.wait_for(
                MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect(),
                timeout or READ_TIMEOUT,
            )
        # DBusError: the bus refused our Hello.
        except (OSError, TimeoutError, DBusError, ValueError) as e:
            detail = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            raise CtlError(f"cannot connect to the system bus: {detail}") from e
        return cls(connection, timeout)

    def close(self) -> None:
        self._bus.disconnect()

    async def _call(
        self,
        what: str,
        *,
        interface: str,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        destination: str = BUS_NAME,
        path: str = OBJECT_PATH,
        privileged: bool = False,
    ) -> Message:
        timeout = self.timeout or (PRIVILEGED_TIMEOUT if privileged else READ_TIMEOUT)
        # Lets polkit ask for a password through an agent in the caller's session.
        flags = MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION if privileged else MessageFlag.NONE
        try:
            return await bus.call(
                self._bus,
                destination=destination,
                path=path,
                interface=interface,
                member=member,
                signature=signature,
                body=body,
                timeout=timeout,
                flags=flags,
            )
        except RemoteError as e:
            raise ctl_error(what, e, timeout) from e

    async def _call_manager(self, method: str, *args: Any, privileged: bool = False) -> Any:
        """A Manager method as the XML declares it; its one out argument, or None."""
        xml = self.xml_methods[method]
        reply = await self._call(
            method,
            interface=MANAGER_INTERFACE,
            member=method,
            signature=xml.in_signature,
            body=args,
            privileged=privileged,
        )
        self._expect(method, "answered", reply.signature, xml.out_signature)
        return reply.body[0] if reply.body else None

    @staticmethod
    def _expect(name: str, verb: str, got: str, expected: str) -> None:
        if got != expected:
            raise CtlError(
                f"cryptlockd {verb} {name} as '{got}', expected '{expected}' "
                f"(a cryptlockd of another version?)"
            )

    async def properties(self) -> dict[str, Any]:
        reply = await self._call(
            "GetAll",
            interface=PROPERTIES_INTERFACE,
            member="GetAll",
            signature="s",
            body=[MANAGER_INTERFACE],
        )
        values: dict[str, Variant] = reply.body[0]
        for name, sig in self.xml_properties.items():
            got = values.get(name)
            if got is not None:
                self._expect(name, "sent", got.signature, sig)
        return {k: v.value for k, v in values.items()}

    async def check(self) -> list[tuple[str, bool, str]]:
        rows = await self._call_manager("Check")
        return [(str(n), bool(ok), str(d)) for n, ok, d in rows]

    async def get_device(self, name: str) -> list[Any]:
        struct: list[Any] = await self._call_manager("GetDevice", name)
        return struct

    async def privileged(self, method: str, *args: Any) -> None:
        await self._call_manager(method, *args, privileged=True)

    async def _bus_daemon(self, member: str, arg: str) -> Message:
        return await self._call(
            member,
            destination=DBUS_NAME,
            path=DBUS_PATH,
            interface=DBUS_NAME,
            member=member,
            signature="s",
            body=[arg],
        )

    async def subscribe(self) -> str:
        """Ask the bus for the daemon's signals and its name's owner changes; returns the
        owner now (asked after matching, so no change of owner falls in between)."""
        for rule in MATCH_RULES:
            await self._bus_daemon("AddMatch", rule)
        reply = await self._bus_daemon("GetNameOwner", BUS_NAME)
        return str(reply.body[0])

    def on_message(self, handler: Callable[[Message], None]) -> None:
        self._bus.add_message_handler(handler)

    async def wait_for_disconnect(self) -> None:
        await self._bus.wait_for_disconnect()  # type: ignore[no-untyped-call]
