"""Hostile or clumsy callers: each gets a D-Bus error or a correct answer, and the daemon
stays alive with its state unchanged."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from cryptlockd.defs import (
    ERR_INVALID_ARGS,
    ERR_PROPERTY_READ_ONLY,
    ERR_UNKNOWN_INTERFACE,
    ERR_UNKNOWN_METHOD,
    ERR_UNKNOWN_PROPERTY,
    MANAGER_INTERFACE,
    POLKIT_ACTION_CONFIGURE,
    POLKIT_ACTION_SUSPEND,
    PROPERTIES_INTERFACE,
)
from tests.fakesys import FakeSystem
from tests.integration import support
from tests.integration.conftest import Daemon, DaemonFactory, LogindMock, PolkitMock, SystemBus
from tests.integration.support import error_name, message, snapshot, start_settled
from tests.wait import wait_until_async

MiB = 1024 * 1024


async def call(bus: MessageBus, msg: Message, timeout: float = 20.0) -> Message:
    return await support.call(bus, msg, timeout)


def property_call(member: str, signature: str, *body: Any) -> Message:
    return message(member, signature, body, interface=PROPERTIES_INTERFACE)


async def assert_alive_and_unchanged(d: Daemon, bus: MessageBus, before: dict[str, Any]) -> None:
    assert d.alive(), d.log()
    assert await snapshot(bus) == before


@pytest.fixture
def daemon_with_device(
    logind: LogindMock, polkit: PolkitMock, start_daemon: DaemonFactory, luks_system: FakeSystem
) -> Daemon:
    return start_settled(start_daemon, logind, *luks_system.daemon_args())


@pytest.mark.asyncio
async def test_wrong_signatures(daemon_with_device: Daemon, client: MessageBus) -> None:
    before = await snapshot(client)
    cases = [
        message("GetDevice", "i", [42]),
        message("GetDevice", "ss", ["a", "b"]),
        message("GetDevice"),
        message("SetEnabled", "s", ["false"]),
        message("SetEnabled", "bb", [False, False]),
        message("Check", "s", ["x"]),
        message("Suspend", "b", [True]),
        message("Reload", "as", [["x"]]),
    ]
    for msg in cases:
        reply = await call(client, msg)
        assert error_name(reply) == ERR_INVALID_ARGS, msg.member
    # Unknown names, and properties: read-only, unknown names, wrong types.
    for msg, expected in [
        (message("NoSuchMethod"), ERR_UNKNOWN_METHOD),
        (message("Check", interface="org.example.Nope"), ERR_UNKNOWN_INTERFACE),
        (
            property_call("Set", "ssv", MANAGER_INTERFACE, "Enabled", Variant("b", False)),
            ERR_PROPERTY_READ_ONLY,
        ),
        (property_call("Get", "ss", MANAGER_INTERFACE, "NoSuchProperty"), ERR_UNKNOWN_PROPERTY),
        (property_call("Get", "s", MANAGER_INTERFACE), ERR_INVALID_ARGS),
    ]:
        assert error_name(await call(client, msg)) == expected, msg.member
    # No interface field at all is legal D-Bus; it must still be answered correctly.
    reply = await call(client, message("Check", interface=None))
    assert reply.message_type == MessageType.METHOD_RETURN
    await assert_alive_and_unchanged(daemon_with_device, client, before)


@pytest.mark.asyncio
async def test_unknown_and_huge_device_names(
    daemon_with_device: Daemon, client: MessageBus
) -> None:
    before = await snapshot(client)
    for name in ("nope", "", "../../etc/passwd", "x" * MiB, "\u00e9\u4e2d" * 1000):
        reply = await call(client, message("GetDevice", "s", [name]))
        assert error_name(reply) == "org.cryptlockd1.Error.NoSuchDevice"
        assert len(reply.body[0]) < 1000  # the error does not echo a megabyte back
    reply = await call(client, message("GetDevice", "s", ["cryptroot"]))
    assert reply.message_type == MessageType.METHOD_RETURN
    assert reply.body[0][0] == "cryptroot" and reply.body[0][4] is True
    # A megabyte where a property name goes.
    reply = await call(client, property_call("Get", "ss", MANAGER_INTERFACE, "P" * MiB))
    assert error_name(reply) == ERR_UNKNOWN_PROPERTY
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
            (message("Check"), MessageType.METHOD_RETURN),
            (message("GetDevice", "s", ["cryptroot"]), MessageType.METHOD_RETURN),
            (message("GetDevice", "s", ["nope"]), MessageType.ERROR),
            (message("SetEnabled", "b", [False]), MessageType.ERROR),  # polkit says no
        ]
        calls = []
        for i in range(200):
            proto, expected = kinds[i % len(kinds)]
            msg = message(str(proto.member), proto.signature, list(proto.body))
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
    polkit.allow(POLKIT_ACTION_SUSPEND, POLKIT_ACTION_CONFIGURE)
    polkit.hang(True)
    quitter = await MessageBus(bus_address=system_bus.address).connect()
    quitter.send(message("SetEnabled", "b", [False]))
    quitter.send(message("Suspend"))
    await wait_until_async(polkit.have_hanging_calls, message="the daemon is waiting for polkit")
    quitter.disconnect()
    # polkit now answers "yes" for a caller that is gone: the daemon must not act on
    # behalf of a vanished caller, nor choke on replying to it.
    polkit.hang(False)
    polkit.release_hanging_calls()
    reply = await call(client, message("Check"))
    assert reply.message_type == MessageType.METHOD_RETURN
    await assert_alive_and_unchanged(daemon_with_device, client, before)
    assert logind.method_calls("Suspend") == []
