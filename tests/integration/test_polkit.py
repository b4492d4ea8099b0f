"""Privileged methods ask polkit, with the caller's bus name as subject; denied, failed
and timed-out checks change nothing."""

from __future__ import annotations

import time

import pytest
from dbus_fast import DBusError
from dbus_fast.aio import MessageBus

from cryptlockd.defs import POLKIT_ACTION_CONFIGURE, POLKIT_ACTION_SUSPEND
from tests.integration.conftest import DaemonFactory, LogindMock, PolkitMock
from tests.integration.support import eventually, get_property, manager_proxy

NOT_AUTHORIZED = "org.cryptlockd1.Error.NotAuthorized"
POLKIT_TIMEOUT = 2.0


@pytest.mark.asyncio
async def test_suspend_allowed_but_not_protected_is_refused(
    logind: LogindMock, polkit: PolkitMock, start_daemon: DaemonFactory, client: MessageBus
) -> None:
    # The host has no dm-crypt, so the daemon here is never Protected: polkit lets the
    # call through, and the protection check refuses it without asking logind. (The
    # protected path, Suspend -> logind -> a full cycle, runs in the guest: test_cycle.)
    start_daemon()
    polkit.allow(POLKIT_ACTION_SUSPEND)
    manager = await manager_proxy(client)
    assert await get_property(client, "Protected") is False
    with pytest.raises(DBusError) as e:
        await manager.call_suspend()  # type: ignore[attr-defined]
    assert e.value.type == "org.cryptlockd1.Error.NotProtected"
    assert "would not wipe the keys" in str(e.value.text)
    assert logind.method_calls("Suspend") == []
    # The subject is the caller's unique name from the message header.
    [(_ts, (subject, action, _details, flags, _cancel))] = polkit.method_calls("CheckAuthorization")
    assert str(action) == POLKIT_ACTION_SUSPEND
    assert int(flags) == 1  # AllowUserInteraction
    assert str(subject[0]) == "system-bus-name"
    assert str(subject[1]["name"]) == client.unique_name


@pytest.mark.asyncio
async def test_suspend_denied_does_not_suspend(
    logind: LogindMock, polkit: PolkitMock, start_daemon: DaemonFactory, client: MessageBus
) -> None:
    start_daemon()
    polkit.allow(POLKIT_ACTION_CONFIGURE)  # the wrong action
    manager = await manager_proxy(client)
    with pytest.raises(DBusError) as e:
        await manager.call_suspend()  # type: ignore[attr-defined]
    assert e.value.type == NOT_AUTHORIZED
    assert logind.method_calls("Suspend") == []


@pytest.mark.asyncio
async def test_set_enabled_allowed_and_denied(
    logind: LogindMock, polkit: PolkitMock, start_daemon: DaemonFactory, client: MessageBus
) -> None:
    start_daemon()
    manager = await manager_proxy(client)
    assert await get_property(client, "Enabled") is True

    with pytest.raises(DBusError) as e:
        await manager.call_set_enabled(False)  # type: ignore[attr-defined]
    assert e.value.type == NOT_AUTHORIZED
    assert await get_property(client, "Enabled") is True

    changed: list[dict[str, object]] = []
    manager_props = client.get_proxy_object(
        "org.cryptlockd1", "/org/cryptlockd1", await _properties_xml()
    ).get_interface("org.freedesktop.DBus.Properties")
    manager_props.on_properties_changed(  # type: ignore[attr-defined]
        lambda iface, props, _inv: changed.append(props)
    )

    polkit.allow(POLKIT_ACTION_CONFIGURE)
    await manager.call_set_enabled(False)  # type: ignore[attr-defined]
    assert await get_property(client, "Enabled") is False
    actions = {str(args[1]) for _ts, args in polkit.method_calls("CheckAuthorization")}
    assert actions == {POLKIT_ACTION_CONFIGURE}
    problems = await get_property(client, "Problems")
    assert any(p.startswith("enabled:") for p in problems)
    eventually(lambda: any("Enabled" in c for c in changed), message="PropertiesChanged")
    await manager.call_set_enabled(True)  # type: ignore[attr-defined]
    assert await get_property(client, "Enabled") is True


@pytest.mark.asyncio
async def test_reload_needs_configure(
    logind: LogindMock, polkit: PolkitMock, start_daemon: DaemonFactory, client: MessageBus
) -> None:
    start_daemon()
    manager = await manager_proxy(client)
    with pytest.raises(DBusError) as e:
        await manager.call_reload()  # type: ignore[attr-defined]
    assert e.value.type == NOT_AUTHORIZED
    polkit.allow(POLKIT_ACTION_CONFIGURE)
    await manager.call_reload()  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_hanging_polkit_means_denied(
    logind: LogindMock, polkit: PolkitMock, start_daemon: DaemonFactory, client: MessageBus
) -> None:
    d = start_daemon("--polkit-timeout", str(POLKIT_TIMEOUT))
    polkit.allow(POLKIT_ACTION_SUSPEND, POLKIT_ACTION_CONFIGURE)
    polkit.hang(True)
    manager = await manager_proxy(client)
    for call in (manager.call_suspend, manager.call_reload):  # type: ignore[attr-defined]
        t0 = time.monotonic()
        with pytest.raises(DBusError) as e:
            await call()
        assert e.value.type == NOT_AUTHORIZED
        assert time.monotonic() - t0 < POLKIT_TIMEOUT + 8  # generous: shared CPUs
    with pytest.raises(DBusError) as e:
        await manager.call_set_enabled(False)  # type: ignore[attr-defined]
    assert e.value.type == NOT_AUTHORIZED
    assert polkit.have_hanging_calls()
    # Answers arriving after the deadline change nothing either.
    polkit.release_hanging_calls()
    assert await get_property(client, "Enabled") is True
    assert logind.method_calls("Suspend") == []
    assert d.alive()


@pytest.mark.asyncio
async def test_no_polkit_on_the_bus_means_denied(
    logind: LogindMock, start_daemon: DaemonFactory, client: MessageBus
) -> None:
    start_daemon()
    manager = await manager_proxy(client)
    with pytest.raises(DBusError) as e:
        await manager.call_set_enabled(False)  # type: ignore[attr-defined]
    assert e.value.type == NOT_AUTHORIZED
    assert await get_property(client, "Enabled") is True


async def _properties_xml() -> str:
    return """<node><interface name="org.freedesktop.DBus.Properties">
      <signal name="PropertiesChanged"><arg type="s"/><arg type="a{sv}"/><arg type="as"/>
      </signal></interface></node>"""
