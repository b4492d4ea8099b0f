"""The daemon's Devices property and GetDevice, with discovery running on fake sysfs,
mountinfo and crypttab trees (--sysfs, --mountinfo, --crypttab)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import DBusError, Message, MessageType
from dbus_fast.aio import MessageBus

from cryptlockd.defs import (
    BUS_NAME,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    POLKIT_ACTION_CONFIGURE,
)
from tests.fakesys import (
    UUID_A,
    UUID_B,
    UUID_C,
    FakeSystem,
    lvm_on_luks,
    plain_luks2,
    two_disks_keyfile,
)
from tests.integration.conftest import DaemonFactory, LogindMock, PolkitMock, SystemBus
from tests.integration.support import eventually_async, get_property, manager_proxy

TIMEOUT = 10.0


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
) -> Callable[[], None]:
    def run() -> None:
        start_daemon(*fake.daemon_args())

    return run


def devices(value: Any) -> list[list[Any]]:
    """Structs come back as lists or tuples; compare them as lists."""
    return [[list(f) if isinstance(f, (list, tuple)) else f for f in d] for d in value]


@pytest.mark.asyncio
async def test_plain_luks2(
    run_daemon: Callable[[], None], fake: FakeSystem, client: MessageBus
) -> None:
    plain_luks2(fake)
    run_daemon()
    expected = ["cryptroot", UUID_A, "LUKS2", "/dev/vda2", True, False, "passphrase", []]
    assert devices(await get_property(client, "Devices")) == [expected]
    manager = await manager_proxy(client)
    got = await asyncio.wait_for(
        manager.call_get_device("cryptroot"),  # type: ignore[attr-defined]
        TIMEOUT,
    )
    assert devices([got]) == [expected]


@pytest.mark.asyncio
async def test_get_device_unknown(
    run_daemon: Callable[[], None], fake: FakeSystem, client: MessageBus
) -> None:
    plain_luks2(fake)
    run_daemon()
    manager = await manager_proxy(client)
    for name in ("nosuch", "", "vda2", "vg0-root"):
        with pytest.raises(DBusError) as exc:
            await asyncio.wait_for(
                manager.call_get_device(name),  # type: ignore[attr-defined]
                TIMEOUT,
            )
        assert exc.value.type == "org.cryptlockd1.Error.NoSuchDevice", name


@pytest.mark.asyncio
async def test_lvm_on_luks(
    run_daemon: Callable[[], None], fake: FakeSystem, client: MessageBus
) -> None:
    lvm_on_luks(fake)
    run_daemon()
    assert devices(await get_property(client, "Devices")) == [
        [
            "nvme0n1p3_crypt",
            UUID_A,
            "LUKS2",
            "/dev/nvme0n1p3",
            True,
            False,
            "passphrase",
            ["vg0-root", "vg0-swap", "vg0-home"],
        ]
    ]


@pytest.mark.asyncio
async def test_two_disks_one_keyfile(
    run_daemon: Callable[[], None], fake: FakeSystem, client: MessageBus
) -> None:
    two_disks_keyfile(fake)
    run_daemon()
    assert devices(await get_property(client, "Devices")) == [
        ["cryptdata", UUID_B, "LUKS2", "/dev/vdb", False, False, "keyfile:/etc/keys/data.key", []],
        ["cryptroot", UUID_A, "LUKS2", "/dev/vda2", True, False, "passphrase", []],
    ]


@pytest.mark.asyncio
async def test_luks1_and_non_luks(
    run_daemon: Callable[[], None], fake: FakeSystem, client: MessageBus
) -> None:
    fake.disk("sda", partitions=3)
    fake.luks("dm-0", "old", UUID_C, ["sda1"], version=1)
    fake.dm("dm-1", "cryptswap", "CRYPT-PLAIN-cryptswap", ["sda2"])
    fake.lv("dm-2", "vg", "plain", ["sda3"])
    fake.mount("/", "dm-2", "/dev/mapper/vg-plain")
    run_daemon()
    assert devices(await get_property(client, "Devices")) == [
        ["old", UUID_C, "LUKS1", "/dev/sda1", False, False, "passphrase", []],
    ]


@pytest.mark.asyncio
async def test_no_luks_is_a_problem(
    run_daemon: Callable[[], None], fake: FakeSystem, client: MessageBus
) -> None:
    fake.disk("sda", partitions=1)
    fake.mount("/", "sda1", "/dev/sda1")
    run_daemon()
    assert await get_property(client, "Devices") == []
    assert await get_property(client, "Protected") is False
    problems = await get_property(client, "Problems")
    assert any("LUKS" in p for p in problems), problems


async def watch_devices(client: MessageBus) -> list[list[list[Any]]]:
    """Collects the Devices values of the daemon's PropertiesChanged signals."""
    seen: list[list[list[Any]]] = []

    def handler(msg: Message) -> None:
        if (
            msg.message_type == MessageType.SIGNAL
            and msg.member == "PropertiesChanged"
            and msg.path == OBJECT_PATH
            and msg.body[0] == MANAGER_INTERFACE
            and "Devices" in msg.body[1]
        ):
            seen.append(devices(msg.body[1]["Devices"].value))

    client.add_message_handler(handler)
    rule = (
        f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
        "interface='org.freedesktop.DBus.Properties',member='PropertiesChanged'"
    )
    reply = await asyncio.wait_for(
        client.call(
            Message(
                destination="org.freedesktop.DBus",
                path="/org/freedesktop/DBus",
                interface="org.freedesktop.DBus",
                member="AddMatch",
                signature="s",
                body=[rule],
            )
        ),
        TIMEOUT,
    )
    assert reply is not None and reply.message_type == MessageType.METHOD_RETURN
    return seen


@pytest.mark.asyncio
async def test_rediscovery_updates_devices_and_signals(
    run_daemon: Callable[[], None], fake: FakeSystem, polkit: PolkitMock, client: MessageBus
) -> None:
    # Hotplug itself (udev events) is proven in the QEMU guest; here Reload, which runs
    # the same rediscovery, shows that changes reach Devices and PropertiesChanged.
    plain_luks2(fake)
    run_daemon()
    seen = await watch_devices(client)
    polkit.allow(POLKIT_ACTION_CONFIGURE)
    manager = await manager_proxy(client)

    fake.disk("vdb")
    fake.luks("dm-1", "cryptnew", UUID_B, ["vdb"])
    await asyncio.wait_for(manager.call_reload(), TIMEOUT)  # type: ignore[attr-defined]
    names = [d[0] for d in devices(await get_property(client, "Devices"))]
    assert names == ["cryptnew", "cryptroot"]
    await eventually_async(
        lambda: seen and [d[0] for d in seen[-1]] == names,
        message="PropertiesChanged with the new Devices",
    )

    fake.set_suspended("dm-1", True)
    await asyncio.wait_for(manager.call_reload(), TIMEOUT)  # type: ignore[attr-defined]
    got = {d[0]: d for d in devices(await get_property(client, "Devices"))}
    assert got["cryptnew"][5] is True and got["cryptroot"][5] is False

    fake.remove("dm-1")
    await asyncio.wait_for(manager.call_reload(), TIMEOUT)  # type: ignore[attr-defined]
    assert [d[0] for d in devices(await get_property(client, "Devices"))] == ["cryptroot"]
    await eventually_async(
        lambda: [d[0] for d in seen[-1]] == ["cryptroot"],
        message="PropertiesChanged after the removal",
    )


@pytest.mark.asyncio
async def test_excluded_device_is_not_listed(
    system_bus: SystemBus,
    logind: LogindMock,
    polkit: PolkitMock,
    start_daemon: DaemonFactory,
    fake: FakeSystem,
    daemon_root: Path,
    client: MessageBus,
) -> None:
    two_disks_keyfile(fake)
    (daemon_root / "etc" / "cryptlockd" / "cryptlockd.conf").write_text(
        f'[devices]\nexclude = ["{UUID_B}"]\n'
    )
    start_daemon(*fake.daemon_args())
    assert [d[0] for d in devices(await get_property(client, "Devices"))] == ["cryptroot"]
