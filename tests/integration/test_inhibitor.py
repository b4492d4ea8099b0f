"""logind's delay inhibitor: taken at start, released on a genuine PrepareForSleep(true)
within 1 s, taken again on PrepareForSleep(false); forged signals and logind restarts."""

from __future__ import annotations

import time

import pytest
from dbus_fast import Message
from dbus_fast.aio import MessageBus

from cryptlockd.defs import LOGIND_MANAGER_INTERFACE, LOGIND_PATH
from tests.fakesys import FakeSystem
from tests.integration.conftest import DaemonFactory, LogindMock, SystemBus, _Reporter
from tests.integration.support import (
    eventually,
    eventually_async,
    get_property,
    watch_properties,
)


def test_inhibitor_held_after_start(logind: LogindMock, start_daemon: DaemonFactory) -> None:
    start_daemon()
    [inhibitor] = eventually(logind.our_inhibitors, message="our inhibitor listed")
    what, who, why, mode = (str(x) for x in inhibitor[:4])
    assert (what, who, mode) == ("sleep", "cryptlockd", "delay")
    assert why


@pytest.mark.asyncio
async def test_released_within_one_second_then_retaken(
    logind: LogindMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    client: MessageBus,
) -> None:
    start_daemon(*luks_system.daemon_args())
    eventually(logind.our_inhibitors, message="inhibitor taken at start")
    changes = watch_properties(client)
    assert await get_property(client, "State") == "idle"

    t0 = time.monotonic()
    logind.prepare_for_sleep(True)
    eventually(
        lambda: not logind.our_inhibitors(),
        timeout=5.0,
        interval=0.005,
        message="inhibitor released after PrepareForSleep(true)",
    )
    elapsed = time.monotonic() - t0
    print(f"inhibitor fd closed {elapsed * 1000:.0f} ms after PrepareForSleep(true)")
    assert elapsed < 1.0
    assert await get_property(client, "State") == "armed"

    logind.prepare_for_sleep(False)
    [again] = eventually(logind.our_inhibitors, message="inhibitor taken again")
    assert str(again[3]) == "delay"
    await eventually_async(lambda: _state_is(client, "idle"), message="State back to idle")
    # Every step was announced with PropertiesChanged.
    await eventually_async(
        lambda: [c["State"] for c in changes if "State" in c] == ["arming", "armed", "idle"],
        message="State changes signalled",
    )

    # And the next sleep works the same way.
    logind.prepare_for_sleep(True)
    eventually(
        lambda: not logind.our_inhibitors(),
        timeout=5.0,
        message="released again on the second sleep",
    )


async def _state_is(client: MessageBus, state: str) -> bool:
    return bool(await get_property(client, "State") == state)


@pytest.mark.asyncio
async def test_forged_prepare_for_sleep_is_ignored(
    logind: LogindMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    client: MessageBus,
) -> None:
    d = start_daemon(*luks_system.daemon_args())
    eventually(logind.our_inhibitors, message="inhibitor taken at start")
    # Same path, interface and member as logind's, from an ordinary connection.
    client.send(
        Message.new_signal(LOGIND_PATH, LOGIND_MANAGER_INTERFACE, "PrepareForSleep", "b", [True])
    )
    # The bus delivers our messages in order, so once this call is answered the daemon
    # has seen (and dropped) the forged signal.
    assert await get_property(client, "State") == "idle"
    eventually(lambda: "ignored a PrepareForSleep" in d.log(), message="forgery logged")
    assert len(logind.our_inhibitors()) == 1
    assert d.alive()


@pytest.mark.asyncio
async def test_forged_owner_change_does_not_make_a_forger_logind(
    logind: LogindMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    client: MessageBus,
) -> None:
    d = start_daemon(*luks_system.daemon_args())
    eventually(logind.our_inhibitors, message="inhibitor taken at start")
    # Claim that logind moved to us, then "be" logind. The bus stamps our own unique name
    # as the sender of both, so neither may count.
    client.send(
        Message.new_signal(
            "/org/freedesktop/DBus",
            "org.freedesktop.DBus",
            "NameOwnerChanged",
            "sss",
            ["org.freedesktop.login1", "", client.unique_name],
        )
    )
    client.send(
        Message.new_signal(LOGIND_PATH, LOGIND_MANAGER_INTERFACE, "PrepareForSleep", "b", [True])
    )
    assert await get_property(client, "State") == "idle"
    assert len(logind.our_inhibitors()) == 1
    assert "owner: " not in d.log().split("took the logind delay inhibitor")[-1]
    # The genuine logind is still obeyed.
    logind.prepare_for_sleep(True)
    eventually(lambda: not logind.our_inhibitors(), timeout=5.0, message="genuine signal")


@pytest.mark.asyncio
async def test_logind_restart_is_survived(
    system_bus: SystemBus,
    logind: LogindMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    client: MessageBus,
) -> None:
    d = start_daemon(*luks_system.daemon_args())
    eventually(logind.our_inhibitors, message="inhibitor taken at start")
    logind.restart()
    # The new logind knows nothing of the old lock: we must have asked it again.
    [inhibitor] = eventually(logind.our_inhibitors, message="inhibitor taken from new logind")
    assert str(inhibitor[3]) == "delay"
    assert d.alive()
    # The new owner's signals are the genuine ones now.
    logind.prepare_for_sleep(True)
    eventually(
        lambda: not logind.our_inhibitors(),
        timeout=5.0,
        message="released on PrepareForSleep(true) from the new logind",
    )
    logind.prepare_for_sleep(False)
    eventually(logind.our_inhibitors, message="retaken from the new logind")


@pytest.mark.asyncio
async def test_logind_appearing_late(
    system_bus: SystemBus,
    start_daemon: DaemonFactory,
    client: MessageBus,
    _reporter: _Reporter,
) -> None:
    start_daemon()
    problems = await get_property(client, "Problems")
    assert any(p.startswith("logind:") for p in problems), problems
    mock = LogindMock(system_bus, _reporter)
    try:
        eventually(mock.our_inhibitors, message="inhibitor taken once logind appears")
        await eventually_async(lambda: _no_logind_problem(client), message="logind problem cleared")
    finally:
        mock.stop()


async def _no_logind_problem(client: MessageBus) -> bool:
    problems = await get_property(client, "Problems")
    return not any(p.startswith("logind:") for p in problems)
