"""Helpers for the host integration suite: polling with deadlines, and a Manager proxy."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from dbus_fast import Variant
from dbus_fast.aio import MessageBus, ProxyInterface

from cryptlockd.defs import BUS_NAME, INTROSPECTION_XML, MANAGER_INTERFACE, OBJECT_PATH

T = TypeVar("T")

# The machine is shared with a QEMU guest under TCG: deadlines are generous, and a test
# that passes quickly still passes quickly.
DEFAULT_TIMEOUT = 10.0


class GiveUp(Exception):
    """Raised by a predicate when waiting longer cannot help (a process died)."""


def eventually(
    predicate: Callable[[], T],
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.02,
    message: str = "",
) -> T:
    """Poll `predicate` until it returns something truthy; fail with `message` at the deadline.
    Exceptions from the predicate count as "not yet" and the last one is shown, except
    GiveUp, which fails at once."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if result:
                return result
        except GiveUp:
            raise
        except Exception as e:
            last_exc = e
        if time.monotonic() > deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"not true within {timeout} s: {message}{detail}")
        time.sleep(interval)


async def eventually_async(
    predicate: Callable[[], T | Awaitable[T]],
    timeout: float = DEFAULT_TIMEOUT,
    interval: float = 0.02,
    message: str = "",
) -> T:
    """Like `eventually`, for predicates that may be coroutines; yields to the event loop."""
    deadline = time.monotonic() + timeout
    last_exc: BaseException | None = None
    while True:
        try:
            result = predicate()
            if inspect.isawaitable(result):
                result = await result
            if result:
                return result  # type: ignore[return-value]
        except GiveUp:
            raise
        except Exception as e:
            last_exc = e
        if time.monotonic() > deadline:
            detail = f" (last error: {last_exc!r})" if last_exc else ""
            raise AssertionError(f"not true within {timeout} s: {message}{detail}")
        await asyncio.sleep(interval)


async def manager_proxy(bus: MessageBus) -> ProxyInterface:
    """The daemon's Manager interface, built from the shipped XML (never live introspection)."""
    obj = bus.get_proxy_object(BUS_NAME, OBJECT_PATH, INTROSPECTION_XML.read_text())
    return obj.get_interface(MANAGER_INTERFACE)


async def get_property(bus: MessageBus, name: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """One property read through org.freedesktop.DBus.Properties.Get, unwrapped."""
    from dbus_fast import Message, MessageType

    reply = await asyncio.wait_for(
        bus.call(
            Message(
                destination=BUS_NAME,
                path=OBJECT_PATH,
                interface="org.freedesktop.DBus.Properties",
                member="Get",
                signature="ss",
                body=[MANAGER_INTERFACE, name],
            )
        ),
        timeout,
    )
    assert reply is not None
    if reply.message_type == MessageType.ERROR:
        raise AssertionError(f"Get {name}: {reply.error_name}: {reply.body}")
    value = reply.body[0]
    return value.value if isinstance(value, Variant) else value


_PROPERTIES_XML = """<node><interface name="org.freedesktop.DBus.Properties">
  <signal name="PropertiesChanged">
    <arg type="s"/><arg type="a{sv}"/><arg type="as"/>
  </signal>
</interface></node>"""


def watch_properties(bus: MessageBus) -> list[dict[str, Any]]:
    """Collect the daemon's PropertiesChanged, unwrapped, in arrival order."""
    seen: list[dict[str, Any]] = []
    props = bus.get_proxy_object(BUS_NAME, OBJECT_PATH, _PROPERTIES_XML).get_interface(
        "org.freedesktop.DBus.Properties"
    )

    def on_changed(iface: str, changed: dict[str, Variant], _invalidated: list[str]) -> None:
        if iface == MANAGER_INTERFACE:
            seen.append({k: v.value for k, v in changed.items()})

    props.on_properties_changed(on_changed)  # type: ignore[attr-defined]
    return seen
