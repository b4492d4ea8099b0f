"""Hostile or clumsy callers: each gets a D-Bus error or a correct answer, and the daemon
stays alive with its state unchanged."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from cryptlockd.defs import BUS_NAME, MANAGER_INTERFACE, OBJECT_PATH
from tests.fakesys import FakeSystem
from tests.integration.conftest import Daemon, DaemonFactory, LogindMock, PolkitMock, SystemBus
from tests.integration.support import eventually

MiB = 1024 * 1024


def manager_call(
    member: str,
    signature: str = "",
    body: list[Any] | None = None,
    interface: str | None = MANAGER_INTERFACE,
) -> Message:
    return Message(
        destination=BUS_NAME,
        path=OBJECT_PATH,
        interface=interface,
        member=member,
        signature=signature,
        body=body or [],
    )


async def call(bus: MessageBus, msg: Message, timeout: float = 20.0) -> Message:
    reply = await asyncio.wait_for(bus.call(msg), timeout)
    assert reply is not None
    return reply


async def snapshot(bus: MessageBus) -> dict[str, Any]:
    reply = await call(
        bus,
        Message(
            destination=BUS_NAME,
            path=OBJECT_PATH,
            interface="org.freedesktop.DBus.Properties",
            member="GetAll",
            signature="s",
            body=[MANAGER_INTERFACE],
        ),
    )
    assert reply.message_type == MessageType.METHOD_RETURN
    return {k: v.value for k, v in reply.body[0].items()}


def error_name(reply: Message) -> str:
    assert reply.message_type == MessageType.ERROR, reply.body
    return str(reply.error_name)


async def assert_alive_and_unchanged(d: Daemon, bus: MessageBus, before: dict[str, Any]) -> None:
    assert d.alive(), d.log()
    assert await snapshot(bus) == before


@pytest.fixture
def daemon_with_device(
    logind: LogindMock, polkit: PolkitMock, start_daemon: DaemonFactory, luks_system: FakeSystem
) -> Daemon:
    d = start_daemon(*luks_system.daemon_args())
    eventually(logind.our_inhibitors, message="inhibitor taken")
    return d


@pytest.mark.asyncio
async def test_wrong_signatures(daemon_with_device: Daemon, client: MessageBus) -> None:
    before = await snapshot(client)
    cases = [
        manager_call("GetDevice", "i", [42]),
        manager_call("GetDevice", "ss", ["a", "b"]),
        manager_call("GetDevice"),
        manager_call("SetEnabled", "s", ["false"]),
        manager_call("SetEnabled", "bb", [False, False]),
        manager_call("Check", "s", ["x"]),
        manager_call("Suspend", "b", [True]),
        manager_call("Reload", "as", [["x"]]),
    ]
    for msg in cases:
        reply = await call(client, msg)
        assert error_name(reply) == "org.freedesktop.DBus.Error.InvalidArgs", msg.member
    assert (
        error_name(await call(client, manager_call("NoSuchMethod")))
        == "org.freedesktop.DBus.Error.UnknownMethod"
    )
    assert (
        error_name(await call(client, manager_call("Check", interface="org.example.Nope")))
        == "org.freedesktop.DBus.Error.UnknownInterface"
    )
    # Properties: read-only, unknown names, wrong types.
    props = "org.freedesktop.DBus.Properties"
    assert (
        error_name(
            await call(
                client,
                manager_call(
                    "Set", "ssv", [MANAGER_INTERFACE, "Enabled", Variant("b", False)], props
                ),
            )
        )
        == "org.freedesktop.DBus.Error.PropertyReadOnly"
    )
    assert (
        error_name(
            await call(
                client, manager_call("Get", "ss", [MANAGER_INTERFACE, "NoSuchProperty"], props)
            )
        )
        == "org.freedesktop.DBus.Error.UnknownProperty"
    )
    assert (
        error_name(await call(client, manager_call("Get", "s", [MANAGER_INTERFACE], props)))
        == "org.freedesktop.DBus.Error.InvalidArgs"
    )
    # No interface field at all is legal D-Bus; it must still be answered correctly.
    reply = await call(client, manager_call("Check", interface=None))
    assert reply.message_type == MessageType.METHOD_RETURN
    await assert_alive_and_unchanged(daemon_with_device, client, before)


@pytest.mark.asyncio
async def test_unknown_and_huge_device_names(
    daemon_with_device: Daemon, client: MessageBus
) -> None:
    before = await snapshot(client)
    for name in ("nope", "", "../../etc/passwd", "x" * MiB, "\u00e9\u4e2d" * 1000):
        reply = await call(client, manager_call("GetDevice", "s", [name]))
        assert error_name(reply) == "org.cryptlockd1.Error.NoSuchDevice"
        assert len(reply.body[0]) < 1000  # the error does not echo a megabyte back
    reply = await call(client, manager_call("GetDevice", "s", ["cryptroot"]))
    assert reply.message_type == MessageType.METHOD_RETURN
    assert reply.body[0][0] == "cryptroot" and reply.body[0][4] is True
    # A megabyte where a property name goes.
    reply = await call(
        client,
        manager_call(
            "Get", "ss", [MANAGER_INTERFACE, "P" * MiB], "org.freedesktop.DBus.Properties"
        ),
    )
    assert error_name(reply) == "org.freedesktop.DBus.Error.UnknownProperty"
    await assert_alive_and_unchanged(daemon_with_device, client, before)


@pytest.mark.asyncio
@pytest.mark.parametrize("n_conns", [1, 4])
async def test_200_concurrent_calls(
    daemon_with_device: Daemon, client: MessageBus, system_bus: SystemBus, n_conns: int
) -> None:
    before = await snapshot(client)
    # From one connection, and spread over several callers.
    conns = [await MessageBus(bus_address=system_bus.address).connect() for _ in range(n_conns)]
    try:
        kinds = [
            (manager_call("Check"), MessageType.METHOD_RETURN),
            (manager_call("GetDevice", "s", ["cryptroot"]), MessageType.METHOD_RETURN),
            (manager_call("GetDevice", "s", ["nope"]), MessageType.ERROR),
            (manager_call("SetEnabled", "b", [False]), MessageType.ERROR),  # polkit says no
        ]
        calls = []
        for i in range(200):
            proto, expected = kinds[i % len(kinds)]
            msg = manager_call(str(proto.member), proto.signature, list(proto.body))
            calls.append((call(conns[i % len(conns)], msg, timeout=60), expected))
        replies = await asyncio.gather(*(c for c, _ in calls))
        for reply, (_c, expected) in zip(replies, calls, strict=True):
            assert reply.message_type == expected, (reply.error_name, reply.body)
            if expected == MessageType.METHOD_RETURN and reply.signature == "a(sbs)":
                assert {name for name, _ok, _detail in reply.body[0]} >= {"luks-devices"}
    finally:
        for c in conns:
            c.disconnect()
    await assert_alive_and_unchanged(daemon_with_device, client, before)


@pytest.mark.asyncio
async def test_caller_disconnects_mid_call(
    daemon_with_device: Daemon,
    polkit: PolkitMock,
    client: MessageBus,
    system_bus: SystemBus,
    logind: LogindMock,
) -> None:
    before = await snapshot(client)
    polkit.allow("org.cryptlockd1.suspend", "org.cryptlockd1.configure")
    polkit.hang(True)
    quitter = await MessageBus(bus_address=system_bus.address).connect()
    quitter.send(manager_call("SetEnabled", "b", [False]))
    quitter.send(manager_call("Suspend"))
    eventually(polkit.have_hanging_calls, message="the daemon is waiting for polkit")
    quitter.disconnect()
    # polkit now answers "yes" for a caller that is gone: the daemon must not act on
    # behalf of a vanished caller, nor choke on replying to it.
    polkit.hang(False)
    polkit.release_hanging_calls()
    reply = await call(client, manager_call("Check"))
    assert reply.message_type == MessageType.METHOD_RETURN
    await assert_alive_and_unchanged(daemon_with_device, client, before)
    assert logind.method_calls("Suspend") == []
