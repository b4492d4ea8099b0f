"""The helper's unit through systemd's D-Bus API (cryptlockd/daemon/systemd_unit.py), on a
fake connection that answers like systemd: the unit is watched (AddMatch, Subscribe) before
its state is read, and a wait ends on systemd's PropertiesChanged, not on a poll."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
from dbus_fast import Message, MessageType, Variant

from cryptlockd.daemon.systemd_unit import SystemdUnit
from cryptlockd.defs import (
    PROPERTIES_INTERFACE,
    SYSTEMD_ERROR_ALREADY_SUBSCRIBED,
    SYSTEMD_ERROR_NO_SUCH_UNIT,
)

UNIT = "cryptlockd-helper.service"
UNIT_PATH = "/org/freedesktop/systemd1/unit/cryptlockd_2dhelper_2eservice"


class FakeSystemdBus:
    def __init__(self, state: str | None = "active", subscribe_error: str | None = None) -> None:
        self.state = state  # None: the unit is not loaded
        self.subscribe_error = subscribe_error
        self.calls: list[str] = []
        self.handlers: list[Callable[[Message], Any]] = []

    async def call(self, msg: Message) -> Message:
        self.calls.append(str(msg.member))
        msg.serial = len(self.calls)
        if msg.member == "GetUnit":
            if self.state is None:
                return Message.new_error(
                    msg, SYSTEMD_ERROR_NO_SUCH_UNIT, f"Unit {UNIT} not loaded."
                )
            return Message.new_method_return(msg, "o", [UNIT_PATH])
        if msg.member == "Get":
            assert msg.path == UNIT_PATH and msg.body[1] == "ActiveState"
            return Message.new_method_return(msg, "v", [Variant("s", self.state)])
        if msg.member == "Subscribe" and self.subscribe_error:
            return Message.new_error(msg, self.subscribe_error, "Client is already subscribed.")
        return Message.new_method_return(msg, "", [])

    def add_message_handler(self, handler: Callable[[Message], Any]) -> None:
        self.handlers.append(handler)

    def change(self, state: str, path: str = UNIT_PATH) -> None:
        """systemd changes the unit's state and says so."""
        self.state = state
        signal = Message.new_signal(
            path, PROPERTIES_INTERFACE, "PropertiesChanged", "sa{sv}as", ["x", {}, []]
        )
        for handler in self.handlers:
            handler(signal)


def unit_on(bus: FakeSystemdBus) -> SystemdUnit:
    return SystemdUnit(bus, UNIT, timeout=5.0)  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_a_unit_systemd_has_not_loaded_is_inactive() -> None:
    bus = FakeSystemdBus(state=None)
    assert await unit_on(bus).active_state() == "inactive"
    assert bus.calls == ["GetUnit"]  # nothing to watch yet


@pytest.mark.asyncio
async def test_the_unit_is_watched_once_before_its_state_is_read() -> None:
    bus = FakeSystemdBus()
    unit = unit_on(bus)
    assert await unit.active_state() == "active"
    assert bus.calls == ["GetUnit", "AddMatch", "Subscribe", "Get"]
    assert await unit.active_state() == "active"
    assert bus.calls[4:] == ["GetUnit", "Get"]
    assert len(bus.handlers) == 1


@pytest.mark.asyncio
async def test_already_subscribed_is_fine() -> None:
    bus = FakeSystemdBus(subscribe_error=SYSTEMD_ERROR_ALREADY_SUBSCRIBED)
    assert await unit_on(bus).active_state() == "active"


@pytest.mark.asyncio
async def test_a_wait_ends_on_properties_changed() -> None:
    bus = FakeSystemdBus()
    unit = unit_on(bus)
    loop = asyncio.get_running_loop()
    loop.call_later(0.05, bus.change, "deactivating", "/some/other/unit")  # not ours
    loop.call_later(0.1, bus.change, "inactive")
    t0 = time.monotonic()
    state = await unit.wait_while(("active", "deactivating"), time.monotonic() + 10)
    assert state == "inactive" and time.monotonic() - t0 < 5
    # Read at the start and after our unit's change only: no polling.
    assert bus.calls.count("Get") == 2


@pytest.mark.asyncio
async def test_a_wait_stops_at_the_deadline() -> None:
    bus = FakeSystemdBus()
    t0 = time.monotonic()
    assert await unit_on(bus).wait_while(("active",), t0 + 0.1) == "active"
    assert 0.1 <= time.monotonic() - t0 < 5


@pytest.mark.asyncio
async def test_start_and_stop() -> None:
    bus = FakeSystemdBus()
    unit = unit_on(bus)
    await unit.start()
    await unit.stop()
    assert bus.calls == ["StartUnit", "StopUnit"]


def test_signals_that_are_not_ours_are_ignored() -> None:
    bus = FakeSystemdBus()
    unit = unit_on(bus)
    unit._watched = UNIT_PATH
    changed = unit.next_change()
    call = Message(destination="x.y", path=UNIT_PATH, interface=PROPERTIES_INTERFACE, member="Get")
    assert call.message_type == MessageType.METHOD_CALL
    unit._handle(call)
    assert not changed.is_set()


class FakeSleepServiceBus(FakeSystemdBus):
    """systemd-suspend.service with its effective ExecStart=, drop-ins applied."""

    PATH = "/org/freedesktop/systemd1/unit/systemd_2dsuspend_2eservice"

    def __init__(self, argvs: list[list[str]]) -> None:
        super().__init__()
        self.argvs = argvs

    async def call(self, msg: Message) -> Message:
        self.calls.append(str(msg.member))
        msg.serial = len(self.calls)
        if msg.member == "LoadUnit":
            return Message.new_method_return(msg, "o", [self.PATH])
        if msg.member == "Get":
            assert msg.path == self.PATH and tuple(msg.body) == (
                "org.freedesktop.systemd1.Service",
                "ExecStart",
            )
            commands = [[a[0], a, False, 0, 0, 0, 0, 0, 0, 0] for a in self.argvs]
            return Message.new_method_return(msg, "v", [Variant("a(sasbttttuii)", commands)])
        return Message.new_method_return(msg, "", [])


@pytest.mark.asyncio
async def test_the_effective_exec_start_is_each_commands_argv() -> None:
    entry = ["/usr/libexec/cryptlockd/cryptlockd-sleep"]
    bus: Any = FakeSleepServiceBus([entry])
    assert await SystemdUnit(bus, "systemd-suspend.service").exec_start() == [entry]
    assert bus.calls == ["LoadUnit", "Get"]


@pytest.mark.asyncio
async def test_each_daemon_reload_is_heard() -> None:
    bus: Any = FakeSleepServiceBus([])
    heard: list[int] = []
    await SystemdUnit(bus, "systemd-suspend.service").on_reload(lambda: heard.append(1))
    assert bus.calls == ["AddMatch", "Subscribe"]
    for starting in (True, False):
        reloading = Message.new_signal(
            "/org/freedesktop/systemd1",
            "org.freedesktop.systemd1.Manager",
            "Reloading",
            "b",
            [starting],
        )
        for handler in bus.handlers:
            handler(reloading)
    assert heard == [1]  # once the reload is over, not as it starts
