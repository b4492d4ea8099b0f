"""The D-Bus client layer: outgoing calls with timeouts, for the daemon and the CLI.

Every call the project makes goes through `call()` (or a `RemoteInterface`, which wraps it
for one interface of one remote object), on the connection its process owns. An error reply,
a timeout or a lost connection becomes RemoteError there, and only there. (The daemon's
exported object is daemon/exported_object.py.)
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from dbus_fast import Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus

from cryptlockd.defs import (
    DBUS_NAME,
    DBUS_PATH,
    ERR_DISCONNECTED,
    ERR_NO_REPLY,
    ERR_TIMEOUT,
    PROPERTIES_INTERFACE,
)
from cryptlockd.errors import RemoteError

__all__ = ["RemoteError", "RemoteInterface", "add_match", "bus_daemon", "call"]


async def call(
    bus: MessageBus,
    *,
    destination: str,
    path: str,
    interface: str,
    member: str,
    signature: str = "",
    body: Sequence[Any] = (),
    timeout: float,
    flags: MessageFlag = MessageFlag.NONE,
) -> Message:
    """One method call with a deadline; an error reply becomes RemoteError."""
    remote = RemoteInterface(bus, destination, path, interface, timeout)
    return await remote.call(member, signature, body, flags)


@dataclass(frozen=True)
class RemoteInterface:
    """One interface of one remote object, on our connection, with a timeout for each call:
    `await login1.call("Suspend", "b", [False])`, `await login1.get("InhibitDelayMaxUSec")`."""

    bus: MessageBus
    destination: str
    path: str
    interface: str
    timeout: float

    async def call(
        self,
        member: str,
        signature: str = "",
        body: Sequence[Any] = (),
        flags: MessageFlag = MessageFlag.NONE,
    ) -> Message:
        """The reply; an error reply, a timeout or a lost connection raises RemoteError."""
        what = f"{self.destination} {self.interface}.{member}"
        to = (self.destination, self.path, self.interface, member)
        msg = Message(*to, flags=flags, signature=signature, body=list(body))
        try:
            reply = await asyncio.wait_for(self.bus.call(msg), self.timeout)
        except TimeoutError:
            raise RemoteError(what, ERR_TIMEOUT, f"no reply within {self.timeout} s") from None
        except (OSError, EOFError, ConnectionError) as e:
            raise RemoteError(what, ERR_DISCONNECTED, str(e)) from e
        if reply is None:
            raise RemoteError(what, ERR_NO_REPLY, "no reply")
        if reply.message_type == MessageType.ERROR:
            text = reply.body[0] if reply.body and isinstance(reply.body[0], str) else ""
            raise RemoteError(what, reply.error_name or "unknown", text)
        return reply

    async def get(self, name: str) -> Any:
        """A property's value (org.freedesktop.DBus.Properties.Get, the variant unwrapped)."""
        properties = replace(self, interface=PROPERTIES_INTERFACE)
        reply = await properties.call("Get", "ss", [self.interface, name])
        value = reply.body[0]
        return value.value if isinstance(value, Variant) else value

    async def set(self, name: str, signature: str, value: Any) -> None:
        """Set a property (org.freedesktop.DBus.Properties.Set); `signature` is its type."""
        properties = replace(self, interface=PROPERTIES_INTERFACE)
        await properties.call("Set", "ssv", [self.interface, name, Variant(signature, value)])


def bus_daemon(bus: MessageBus, timeout: float) -> RemoteInterface:
    """The message bus itself (org.freedesktop.DBus): AddMatch, GetNameOwner, NameHasOwner."""
    return RemoteInterface(bus, DBUS_NAME, DBUS_PATH, DBUS_NAME, timeout)


async def add_match(bus: MessageBus, rule: str, timeout: float) -> None:
    await bus_daemon(bus, timeout).call("AddMatch", "s", [rule])
