"""Privileged methods ask polkit, with the caller's bus name as subject; denied, failed
and timed-out checks change nothing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable
from typing import Any

import pytest
import pytest_asyncio
from dbus_fast.aio import MessageBus, ProxyInterface

from cryptlockd.defs import POLKIT_ACTION_CONFIGURE, POLKIT_ACTION_SUSPEND
from tests.integration.conftest import DaemonFactory, LogindMock, PolkitMock
from tests.integration.support import dbus_error, get_property, manager_proxy, watch_properties
from tests.wait import wait_until_async

NOT_AUTHORIZED = "org.cryptlockd1.Error.NotAuthorized"
POLKIT_TIMEOUT = 2.0


@pytest.fixture
def daemon(logind: LogindMock, start_daemon: DaemonFactory) -> None:
    start_daemon()


@pytest_asyncio.fixture
async def manager(client: MessageBus) -> ProxyInterface:
    return await manager_proxy(client)


async def assert_not_authorized(call: Awaitable[Any]) -> None:
    assert (await dbus_error(call)).type == NOT_AUTHORIZED


@pytest.mark.asyncio
async def test_suspend_allowed_but_not_protected_is_refused(
    logind: LogindMock,
    polkit: PolkitMock,
    daemon: None,
    manager: ProxyInterface,
    client: MessageBus,
) -> None:
    # The host has no dm-crypt, so the daemon here is never Protected: polkit lets the
    # call through, and the protection check refuses it without asking logind. (The
    # protected path, Suspend -> logind -> a full cycle, runs in the guest: test_cycle.)
    polkit.allow(POLKIT_ACTION_SUSPEND)
    assert await get_property(client, "Protected") is False
    e = await dbus_error(manager.call_suspend())  # type: ignore[attr-defined]
    assert e.type == "org.cryptlockd1.Error.NotProtected"
    assert "would not wipe the keys" in str(e.text)
    assert logind.method_calls("Suspend") == []
    # The subject is the caller's unique name from the message header.
    [(_ts, (subject, action, _details, flags, _cancel))] = polkit.method_calls("CheckAuthorization")
    assert str(action) == POLKIT_ACTION_SUSPEND
    assert int(flags) == 1  # AllowUserInteraction
    assert str(subject[0]) == "system-bus-name"
    assert str(subject[1]["name"]) == client.unique_name


@pytest.mark.asyncio
async def test_suspend_denied_does_not_suspend(
    logind: LogindMock, polkit: PolkitMock, daemon: None, manager: ProxyInterface
) -> None:
    polkit.allow(POLKIT_ACTION_CONFIGURE)  # the wrong action
    await assert_not_authorized(manager.call_suspend())  # type: ignore[attr-defined]
    assert logind.method_calls("Suspend") == []


@pytest.mark.asyncio
async def test_set_enabled_allowed_and_denied(
    polkit: PolkitMock, daemon: None, manager: ProxyInterface, client: MessageBus
) -> None:
    assert await get_property(client, "Enabled") is True

    await assert_not_authorized(manager.call_set_enabled(False))  # type: ignore[attr-defined]
    assert await get_property(client, "Enabled") is True

    changed = await watch_properties(client)
    polkit.allow(POLKIT_ACTION_CONFIGURE)
    await manager.call_set_enabled(False)  # type: ignore[attr-defined]
    assert await get_property(client, "Enabled") is False
    actions = {str(args[1]) for _ts, args in polkit.method_calls("CheckAuthorization")}
    assert actions == {POLKIT_ACTION_CONFIGURE}
    problems = await get_property(client, "Problems")
    assert any(p.startswith("enabled:") for p in problems)
    await wait_until_async(
        lambda: any("Enabled" in c for c in changed), message="PropertiesChanged"
    )
    await manager.call_set_enabled(True)  # type: ignore[attr-defined]
    assert await get_property(client, "Enabled") is True


@pytest.mark.asyncio
async def test_reload_needs_configure(
    polkit: PolkitMock, daemon: None, manager: ProxyInterface
) -> None:
    await assert_not_authorized(manager.call_reload())  # type: ignore[attr-defined]
    polkit.allow(POLKIT_ACTION_CONFIGURE)
    await manager.call_reload()  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_hanging_polkit_means_denied(
    logind: LogindMock,
    polkit: PolkitMock,
    start_daemon: DaemonFactory,
    manager: ProxyInterface,
    client: MessageBus,
) -> None:
    d = await asyncio.to_thread(start_daemon, "--polkit-timeout", str(POLKIT_TIMEOUT))
    polkit.allow(POLKIT_ACTION_SUSPEND, POLKIT_ACTION_CONFIGURE)
    polkit.hang(True)
    for call in (manager.call_suspend, manager.call_reload):  # type: ignore[attr-defined]
        t0 = time.monotonic()
        await assert_not_authorized(call())
        assert time.monotonic() - t0 < POLKIT_TIMEOUT + 8  # generous: shared CPUs
    await assert_not_authorized(manager.call_set_enabled(False))  # type: ignore[attr-defined]
    assert polkit.have_hanging_calls()
    # Answers arriving after the deadline change nothing either.
    polkit.release_hanging_calls()
    assert await get_property(client, "Enabled") is True
    assert logind.method_calls("Suspend") == []
    assert d.alive()


@pytest.mark.asyncio
async def test_no_polkit_on_the_bus_means_denied(
    daemon: None, manager: ProxyInterface, client: MessageBus
) -> None:
    await assert_not_authorized(manager.call_set_enabled(False))  # type: ignore[attr-defined]
    assert await get_property(client, "Enabled") is True
