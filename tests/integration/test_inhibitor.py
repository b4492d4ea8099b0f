"""logind's delay inhibitor: taken at start, released on a genuine PrepareForSleep(true),
taken again on PrepareForSleep(false); forged signals and logind restarts. (How long the
lock is held is a figure, not a pass mark: `python -m bench.inhibitor`.)"""

from __future__ import annotations

import asyncio

import pytest
from dbus_fast import Message
from dbus_fast.aio import MessageBus

from cryptlockd.defs import (
    DBUS_NAME,
    DBUS_PATH,
    LOGIND_BUS_NAME,
    LOGIND_MANAGER_INTERFACE,
    LOGIND_PATH,
)
from tests.fakesys import FakeSystem
from tests.integration.conftest import Daemon, DaemonFactory, LogindMock, Reporter, SystemBus
from tests.integration.support import get_property, start_settled, watch_properties
from tests.wait import wait_until, wait_until_async


@pytest.fixture
def daemon(logind: LogindMock, start_daemon: DaemonFactory, luks_system: FakeSystem) -> Daemon:
    return start_settled(start_daemon, logind, *luks_system.daemon_args())


def forged_prepare_for_sleep() -> Message:
    """Same path, interface and member as logind's, from an ordinary connection."""
    return Message.new_signal(LOGIND_PATH, LOGIND_MANAGER_INTERFACE, "PrepareForSleep", "b", [True])


async def released(logind: LogindMock, message: str) -> None:
    await wait_until_async(lambda: not logind.our_inhibitors(), timeout=5.0, message=message)


def test_inhibitor_held_after_start(logind: LogindMock, start_daemon: DaemonFactory) -> None:
    start_daemon()
    [inhibitor] = wait_until(logind.our_inhibitors, message="our inhibitor listed")
    what, who, why, mode = (str(x) for x in inhibitor[:4])
    assert (what, who, mode) == ("sleep", "cryptlockd", "delay")
    assert why


@pytest.mark.asyncio
async def test_released_on_prepare_for_sleep_then_retaken(
    logind: LogindMock, daemon: Daemon, client: MessageBus
) -> None:
    changes = await watch_properties(client)
    assert await get_property(client, "State") == "idle"

    logind.prepare_for_sleep(True)
    await released(logind, "inhibitor released after PrepareForSleep(true)")
    assert await get_property(client, "State") == "armed"

    logind.prepare_for_sleep(False)
    [again] = await wait_until_async(logind.our_inhibitors, message="inhibitor taken again")
    assert str(again[3]) == "delay"
    await wait_until_async(lambda: _state_is(client, "idle"), message="State back to idle")
    # Every step was announced with PropertiesChanged.
    await wait_until_async(
        lambda: [c["State"] for c in changes if "State" in c] == ["arming", "armed", "idle"],
        message="State changes signalled",
    )

    # And the next sleep works the same way.
    logind.prepare_for_sleep(True)
    await released(logind, "released again on the second sleep")


async def _state_is(client: MessageBus, state: str) -> bool:
    return bool(await get_property(client, "State") == state)


@pytest.mark.asyncio
async def test_forged_prepare_for_sleep_is_ignored(
    logind: LogindMock, daemon: Daemon, client: MessageBus
) -> None:
    client.send(forged_prepare_for_sleep())
    # The bus delivers our messages in order, so once this call is answered the daemon
    # has seen (and dropped) the forged signal.
    assert await get_property(client, "State") == "idle"
    await wait_until_async(
        lambda: "ignored a PrepareForSleep" in daemon.log(), message="forgery logged"
    )
    assert len(logind.our_inhibitors()) == 1
    assert daemon.alive()


@pytest.mark.asyncio
async def test_forged_owner_change_does_not_make_a_forger_logind(
    logind: LogindMock, daemon: Daemon, client: MessageBus
) -> None:
    # Claim that logind moved to us, then "be" logind. The bus stamps our own unique name
    # as the sender of both, so neither may count.
    client.send(
        Message.new_signal(
            DBUS_PATH,
            DBUS_NAME,
            "NameOwnerChanged",
            "sss",
            [LOGIND_BUS_NAME, "", client.unique_name],
        )
    )
    client.send(forged_prepare_for_sleep())
    assert await get_property(client, "State") == "idle"
    assert len(logind.our_inhibitors()) == 1
    assert "owner: " not in daemon.log().split("took the logind delay inhibitor")[-1]
    # The genuine logind is still obeyed.
    logind.prepare_for_sleep(True)
    await released(logind, "genuine signal")


def test_logind_restart_is_survived(logind: LogindMock, daemon: Daemon) -> None:
    logind.restart()
    # The new logind knows nothing of the old lock: we must have asked it again.
    [inhibitor] = wait_until(logind.our_inhibitors, message="inhibitor taken from new logind")
    assert str(inhibitor[3]) == "delay"
    assert daemon.alive()
    # The new owner's signals are the genuine ones now.
    logind.prepare_for_sleep(True)
    wait_until(
        lambda: not logind.our_inhibitors(),
        timeout=5.0,
        message="released on PrepareForSleep(true) from the new logind",
    )
    logind.prepare_for_sleep(False)
    wait_until(logind.our_inhibitors, message="retaken from the new logind")


@pytest.mark.asyncio
async def test_logind_appearing_late(
    system_bus: SystemBus, start_daemon: DaemonFactory, client: MessageBus, _reporter: Reporter
) -> None:
    await asyncio.to_thread(start_daemon)
    problems = await get_property(client, "Problems")
    assert any(p.startswith("logind:") for p in problems), problems
    mock = await asyncio.to_thread(LogindMock, system_bus, _reporter)
    try:
        await wait_until_async(mock.our_inhibitors, message="inhibitor taken once logind appears")
        await wait_until_async(lambda: _no_logind_problem(client), message="logind problem cleared")
    finally:
        mock.stop()


async def _no_logind_problem(client: MessageBus) -> bool:
    problems = await get_property(client, "Problems")
    return not any(p.startswith("logind:") for p in problems)
