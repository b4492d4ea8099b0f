"""The D-Bus client layer (cryptlockd/bus.py): outgoing calls, where every failure becomes
RemoteError."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from dbus_fast import Message, Variant

from cryptlockd.bus import RemoteInterface, bus_daemon
from cryptlockd.defs import ERR_DISCONNECTED, ERR_TIMEOUT, PROPERTIES_INTERFACE
from cryptlockd.errors import RemoteError


class FakeBus:
    """Answers each call with `answer(msg)`: a reply, an exception to raise, or a hang."""

    def __init__(self, answer: Any) -> None:
        self.answer = answer
        self.calls: list[Message] = []

    async def call(self, msg: Message) -> Message | None:
        self.calls.append(msg)
        msg.serial = len(self.calls)  # as the connection numbers what it sends
        result = self.answer(msg)
        if isinstance(result, BaseException):
            raise result
        if result == "hang":
            await asyncio.sleep(3600)
        return result  # type: ignore[no-any-return]


def login1(bus: FakeBus, timeout: float = 5.0) -> RemoteInterface:
    return RemoteInterface(
        bus,  # type: ignore[arg-type]
        "org.freedesktop.login1",
        "/org/freedesktop/login1",
        "org.freedesktop.login1.Manager",
        timeout,
    )


@pytest.mark.asyncio
async def test_get_asks_the_properties_interface_and_unwraps() -> None:
    bus = FakeBus(lambda m: Message.new_method_return(m, "v", [Variant("t", 5_000_000)]))
    assert await login1(bus).get("InhibitDelayMaxUSec") == 5_000_000
    [msg] = bus.calls
    assert (msg.interface, msg.member, msg.signature) == (PROPERTIES_INTERFACE, "Get", "ss")
    assert msg.body == ["org.freedesktop.login1.Manager", "InhibitDelayMaxUSec"]
    assert msg.destination == "org.freedesktop.login1" and msg.path == "/org/freedesktop/login1"


@pytest.mark.asyncio
async def test_set_sends_the_value_as_a_variant_of_its_type() -> None:
    bus = FakeBus(lambda m: Message.new_method_return(m))
    await login1(bus).set("IdleAction", "s", "ignore")
    [msg] = bus.calls
    assert (msg.interface, msg.member, msg.signature) == (PROPERTIES_INTERFACE, "Set", "ssv")
    assert msg.body[:2] == ["org.freedesktop.login1.Manager", "IdleAction"]
    assert (msg.body[2].signature, msg.body[2].value) == ("s", "ignore")


@pytest.mark.asyncio
async def test_an_error_reply_becomes_remote_error() -> None:
    bus = FakeBus(lambda m: Message.new_error(m, "org.freedesktop.DBus.Error.AccessDenied", "no"))
    with pytest.raises(RemoteError) as e:
        await login1(bus).call("Suspend", "b", [False])
    assert e.value.error_name == "org.freedesktop.DBus.Error.AccessDenied"
    assert e.value.text == "no"
    assert e.value.what == "org.freedesktop.login1 org.freedesktop.login1.Manager.Suspend"


@pytest.mark.asyncio
async def test_timeouts_and_lost_connections_become_remote_error() -> None:
    with pytest.raises(RemoteError) as e:
        await login1(FakeBus(lambda m: "hang"), timeout=0.01).call("Suspend", "b", [False])
    assert e.value.error_name == ERR_TIMEOUT
    with pytest.raises(RemoteError) as e:
        gone: Any = FakeBus(lambda m: EOFError())
        await bus_daemon(gone, 1.0).call("NameHasOwner", "s", [":1.1"])
    assert e.value.error_name == ERR_DISCONNECTED
