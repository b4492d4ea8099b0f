"""The daemon's Devices property and GetDevice, with discovery running on fake sysfs,
mountinfo and crypttab trees (--sysfs, --mountinfo, --crypttab)."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus

from cryptlockd.defs import POLKIT_ACTION_CONFIGURE
from tests.fakesys import LAYOUTS, UUID_B, UUID_C, FakeSystem, plain_luks2, two_disks_keyfile
from tests.integration.conftest import DaemonFactory, LogindMock, PolkitMock, SystemBus
from tests.integration.support import (
    dbus_error,
    device_names_signalled,
    devices,
    get_property,
    manager_proxy,
    watch_properties,
)
from tests.wait import DEFAULT_TIMEOUT, wait_until_async


@pytest.fixture
def fake(tmp_path: Path) -> FakeSystem:
    return FakeSystem(tmp_path / "fake")


@pytest.fixture
def run_daemon(
    system_bus: SystemBus,
    logind: LogindMock,
    polkit: PolkitMock,
    start_daemon: DaemonFactory,
    fake: FakeSystem,
) -> Callable[[], Awaitable[object]]:
    """Starts the daemon on `fake` as the test has built it, off the test's event loop."""

    def run() -> Awaitable[object]:
        return asyncio.to_thread(start_daemon, *fake.daemon_args())

    return run


async def device_names(client: MessageBus) -> list[str]:
    return [d[0] for d in devices(await get_property(client, "Devices"))]


@pytest.mark.asyncio
@pytest.mark.parametrize("layout", LAYOUTS)
async def test_layout(
    run_daemon: Callable[[], Awaitable[object]], fake: FakeSystem, client: MessageBus, layout: str
) -> None:
    build, expected = LAYOUTS[layout]
    build(fake)
    await run_daemon()
    assert devices(await get_property(client, "Devices")) == expected
    manager = await manager_proxy(client)
    for struct in expected:
        got = await asyncio.wait_for(
            manager.call_get_device(struct[0]),  # type: ignore[attr-defined]
            DEFAULT_TIMEOUT,
        )
        assert devices([got]) == [struct]


@pytest.mark.asyncio
async def test_get_device_unknown(
    run_daemon: Callable[[], Awaitable[object]], fake: FakeSystem, client: MessageBus
) -> None:
    plain_luks2(fake)
    await run_daemon()
    manager = await manager_proxy(client)
    for name in ("nosuch", "", "vda2", "vg0-root"):
        error = await dbus_error(manager.call_get_device(name))  # type: ignore[attr-defined]
        assert error.type == "org.cryptlockd1.Error.NoSuchDevice", name


@pytest.mark.asyncio
async def test_luks1_and_non_luks(
    run_daemon: Callable[[], Awaitable[object]], fake: FakeSystem, client: MessageBus
) -> None:
    fake.disk("sda", partitions=3)
    fake.luks("dm-0", "old", UUID_C, ["sda1"], version=1)
    fake.dm("dm-1", "cryptswap", "CRYPT-PLAIN-cryptswap", ["sda2"])
    fake.lv("dm-2", "vg", "plain", ["sda3"])
    fake.mount("/", "dm-2", "/dev/mapper/vg-plain")
    await run_daemon()
    assert devices(await get_property(client, "Devices")) == [
        ["old", UUID_C, "LUKS1", "/dev/sda1", False, False, "passphrase", []],
    ]


@pytest.mark.asyncio
async def test_no_luks_is_a_problem(
    run_daemon: Callable[[], Awaitable[object]], fake: FakeSystem, client: MessageBus
) -> None:
    fake.disk("sda", partitions=1)
    fake.mount("/", "sda1", "/dev/sda1")
    await run_daemon()
    assert await get_property(client, "Devices") == []
    assert await get_property(client, "Protected") is False
    problems = await get_property(client, "Problems")
    assert any("LUKS" in p for p in problems), problems


@pytest.mark.asyncio
async def test_rediscovery_updates_devices_and_signals(
    run_daemon: Callable[[], Awaitable[object]],
    fake: FakeSystem,
    polkit: PolkitMock,
    client: MessageBus,
) -> None:
    # Hotplug itself (udev events) is proven in the QEMU guest; here Reload, which runs
    # the same rediscovery, shows that changes reach Devices and PropertiesChanged.
    plain_luks2(fake)
    await run_daemon()
    seen = await watch_properties(client)
    polkit.allow(POLKIT_ACTION_CONFIGURE)
    manager = await manager_proxy(client)

    async def reload() -> None:
        await asyncio.wait_for(manager.call_reload(), DEFAULT_TIMEOUT)  # type: ignore[attr-defined]

    fake.disk("vdb")
    fake.luks("dm-1", "cryptnew", UUID_B, ["vdb"])
    await reload()
    names = await device_names(client)
    assert names == ["cryptnew", "cryptroot"]
    await wait_until_async(
        lambda: device_names_signalled(seen)[-1:] == [names],
        message="PropertiesChanged with the new Devices",
    )

    fake.set_suspended("dm-1", True)
    await reload()
    got = {d[0]: d for d in devices(await get_property(client, "Devices"))}
    assert got["cryptnew"][5] is True and got["cryptroot"][5] is False

    fake.remove("dm-1")
    await reload()
    assert await device_names(client) == ["cryptroot"]
    await wait_until_async(
        lambda: device_names_signalled(seen)[-1] == ["cryptroot"],
        message="PropertiesChanged after the removal",
    )


@pytest.mark.asyncio
async def test_excluded_device_is_not_listed(
    run_daemon: Callable[[], Awaitable[object]],
    fake: FakeSystem,
    daemon_root: Path,
    client: MessageBus,
) -> None:
    two_disks_keyfile(fake)
    (daemon_root / "etc" / "cryptlockd" / "cryptlockd.conf").write_text(
        f'[devices]\nexclude = ["{UUID_B}"]\n'
    )
    await run_daemon()
    assert await device_names(client) == ["cryptroot"]


@pytest.mark.asyncio
async def test_a_plain_dm_crypt_swap_shows_in_problems(
    run_daemon: Callable[[], Awaitable[object]], fake: FakeSystem, client: MessageBus
) -> None:
    # Issue 11: a key the next sleep leaves in RAM is never silent.
    plain_luks2(fake)
    fake.disk("vdc")
    fake.dm("dm-1", "cryptswap", "CRYPT-PLAIN-cryptswap", ["vdc"])
    await run_daemon()
    problems = await get_property(client, "Problems")
    assert any(p.startswith("coverage:") and "cryptswap (a PLAIN mapping" in p for p in problems)
    assert await device_names(client) == ["cryptroot"]
