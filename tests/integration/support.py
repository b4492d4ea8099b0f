"""Helpers for the host integration suite's test bodies: raw calls to the daemon, its
properties and signals, cryptlockctl runs, and a daemon started until it has settled.

The processes themselves (bus, mocks, daemon) belong to conftest.py. Waiting is
tests/wait.py's; an async test awaits blocking fixture machinery (a daemon start, a mock
start) through asyncio.to_thread, so its event loop keeps serving the test's connection.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Awaitable, Sequence
from typing import Any

from dbus_fast import DBusError, Message, MessageType
from dbus_fast.aio import MessageBus, ProxyInterface

from cryptlockd.defs import (
    BUS_NAME,
    DBUS_NAME,
    DBUS_PATH,
    INTROSPECTION_XML,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    PROPERTIES_INTERFACE,
)
from tests.integration.conftest import (
    REPO,
    VENV_PYTHON,
    Daemon,
    DaemonFactory,
    LogindMock,
    SystemBus,
)
from tests.wait import DEFAULT_TIMEOUT, wait_until

# ---- the daemon on the bus ----------------------------------------------------------


def start_settled(start_daemon: DaemonFactory, logind: LogindMock, *args: str) -> Daemon:
    """Started means on the bus; holding its delay inhibitor means its start-up is over."""
    d = start_daemon(*args)
    wait_until(logind.our_inhibitors, message="daemon took its inhibitor")
    return d


def unique_name_of(bus: SystemBus, pid: int) -> str:
    """The unique bus name of the connection opened by process `pid`."""
    import dbus

    bus_daemon = dbus.Interface(bus.conn.get_object(DBUS_NAME, DBUS_PATH), DBUS_NAME)
    for name in bus_daemon.ListNames():
        if name.startswith(":"):
            try:
                if bus_daemon.GetConnectionUnixProcessID(name) == pid:
                    return str(name)
            except dbus.DBusException:
                continue  # that connection went away meanwhile
    raise AssertionError(f"no connection from pid {pid}")


def message(
    member: str,
    signature: str = "",
    body: Sequence[Any] = (),
    *,
    interface: str | None = MANAGER_INTERFACE,
    destination: str = BUS_NAME,
    path: str = OBJECT_PATH,
) -> Message:
    """A method call, by default to the daemon's Manager; interface=None leaves it out."""
    return Message(
        destination=destination,
        path=path,
        interface=interface,
        member=member,
        signature=signature,
        body=list(body),
    )


async def call(bus: MessageBus, msg: Message, timeout: float = DEFAULT_TIMEOUT) -> Message:
    """The reply, an error reply included."""
    reply = await asyncio.wait_for(bus.call(msg), timeout)
    assert reply is not None
    return reply


async def call_ok(bus: MessageBus, msg: Message, timeout: float = DEFAULT_TIMEOUT) -> list[Any]:
    """The reply's body; an error reply fails the test."""
    reply = await call(bus, msg, timeout)
    assert reply.message_type == MessageType.METHOD_RETURN, (reply.error_name, reply.body)
    return list(reply.body)


def error_name(reply: Message) -> str:
    assert reply.message_type == MessageType.ERROR, reply.body
    return str(reply.error_name)


async def bus_daemon(bus: MessageBus, member: str, signature: str = "", *body: Any) -> Any:
    """A call to the bus itself (AddMatch, ListNames...); its one return value."""
    msg = message(
        member, signature, body, interface=DBUS_NAME, destination=DBUS_NAME, path=DBUS_PATH
    )
    out = await call_ok(bus, msg)
    return out[0] if out else None


async def get_all(bus: MessageBus) -> dict[str, Any]:
    """Every property through org.freedesktop.DBus.Properties.GetAll, as variants."""
    [values] = await call_ok(
        bus, message("GetAll", "s", [MANAGER_INTERFACE], interface=PROPERTIES_INTERFACE)
    )
    return dict(values)


async def snapshot(bus: MessageBus) -> dict[str, Any]:
    """Every property, unwrapped."""
    return {k: v.value for k, v in (await get_all(bus)).items()}


async def get_property(bus: MessageBus, name: str, timeout: float = DEFAULT_TIMEOUT) -> Any:
    """One property read through org.freedesktop.DBus.Properties.Get, unwrapped."""
    msg = message("Get", "ss", [MANAGER_INTERFACE, name], interface=PROPERTIES_INTERFACE)
    [value] = await call_ok(bus, msg, timeout)
    return value.value


async def manager_proxy(bus: MessageBus) -> ProxyInterface:
    """The daemon's Manager interface, built from the shipped XML (never live introspection)."""
    obj = bus.get_proxy_object(BUS_NAME, OBJECT_PATH, INTROSPECTION_XML.read_text())
    return obj.get_interface(MANAGER_INTERFACE)


async def dbus_error(aw: Awaitable[Any]) -> DBusError:
    """The D-Bus error a proxy call must fail with."""
    try:
        await asyncio.wait_for(aw, DEFAULT_TIMEOUT)
    except DBusError as e:
        return e
    raise AssertionError("the call succeeded; a D-Bus error was expected")


async def watch_properties(bus: MessageBus) -> list[dict[str, Any]]:
    """The daemon's PropertiesChanged from now on, unwrapped, in arrival order."""
    seen: list[dict[str, Any]] = []

    def handler(msg: Message) -> None:
        if (
            msg.message_type == MessageType.SIGNAL
            and msg.member == "PropertiesChanged"
            and msg.interface == PROPERTIES_INTERFACE
            and msg.path == OBJECT_PATH
            and msg.body[0] == MANAGER_INTERFACE
        ):
            seen.append({k: v.value for k, v in msg.body[1].items()})

    bus.add_message_handler(handler)
    rule = (
        f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
        f"interface='{PROPERTIES_INTERFACE}',member='PropertiesChanged'"
    )
    await bus_daemon(bus, "AddMatch", "s", rule)
    return seen


def devices(value: Any) -> list[list[Any]]:
    """Devices structs come back as lists or tuples; compare them as lists."""
    return [[list(f) if isinstance(f, (list, tuple)) else f for f in d] for d in value]


def device_names_signalled(seen: list[dict[str, Any]]) -> list[list[str]]:
    """The dm names in each Devices value that watch_properties saw."""
    return [[d[0] for d in change["Devices"]] for change in seen if "Devices" in change]


# ---- cryptlockctl -------------------------------------------------------------------

CTL = [str(VENV_PYTHON), "-m", "cryptlockd.cli"]


def ctl(
    bus: SystemBus, *args: str, env: dict[str, str] | None = None, timeout: float = 60.0
) -> subprocess.CompletedProcess[str]:
    """cryptlockctl on the private bus, to the end."""
    return subprocess.run(
        [*CTL, *args],
        env=bus.env(env),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
