"""Reload(): a bad drop-in is refused with ConfigInvalid naming file and key, and the last
good configuration stays in force; a good change takes effect."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import pytest_asyncio
from dbus_fast import DBusError
from dbus_fast.aio import MessageBus, ProxyInterface

from cryptlockd.defs import POLKIT_ACTION_CONFIGURE
from tests.fakesys import UUID_B, FakeSystem, two_disks_keyfile
from tests.integration.conftest import DaemonFactory, LogindMock, PolkitMock, SystemBus
from tests.integration.support import dbus_error, get_property, manager_proxy
from tests.wait import DEFAULT_TIMEOUT

CONFIG_INVALID = "org.cryptlockd1.Error.ConfigInvalid"


@pytest.fixture
def etc(daemon_root: Path) -> Path:
    return daemon_root / "etc" / "cryptlockd"


@pytest.fixture
def dropins(daemon_root: Path) -> Path:
    d = daemon_root / "etc" / "cryptlockd" / "cryptlockd.conf.d"
    d.mkdir(parents=True)
    return d


@pytest_asyncio.fixture
async def manager(
    system_bus: SystemBus,
    logind: LogindMock,
    polkit: PolkitMock,
    start_daemon: DaemonFactory,
    tmp_path: Path,
    etc: Path,
    client: MessageBus,
) -> ProxyInterface:
    fake = FakeSystem(tmp_path / "fake")
    two_disks_keyfile(fake)
    (etc / "cryptlockd.conf").write_text("enabled = false\n")
    await asyncio.to_thread(start_daemon, *fake.daemon_args())
    polkit.allow(POLKIT_ACTION_CONFIGURE)
    return await manager_proxy(client)


async def reload(manager: ProxyInterface) -> None:
    await asyncio.wait_for(manager.call_reload(), DEFAULT_TIMEOUT)  # type: ignore[attr-defined]


async def reload_error(manager: ProxyInterface) -> DBusError:
    return await dbus_error(reload(manager))


async def device_names(client: MessageBus) -> list[str]:
    return [d[0] for d in await get_property(client, "Devices")]


@pytest.mark.asyncio
@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[prompt]\nretries = 3\n", "prompt.retries: unknown setting"),
        ('enabled = "yes"\n', "enabled: Input should be a valid boolean"),
        ('[devices]\nexclude = "cryptdata"\n', "devices.exclude: "),
        ("enabled = true\n[prompt\n", "invalid TOML: "),
    ],
)
async def test_bad_dropin_is_refused_and_the_last_good_config_kept(
    manager: ProxyInterface, client: MessageBus, dropins: Path, text: str, message: str
) -> None:
    assert await get_property(client, "Enabled") is False  # from the main file
    # The bad file also tries to turn protection on; none of it may take effect.
    bad = dropins / "10-x.conf"
    bad.write_text("enabled = true\n" + text if text.startswith("[") else text)
    err = await reload_error(manager)
    assert err.type == CONFIG_INVALID
    assert err.text.startswith(f"{bad}: {message}"), err.text
    assert await get_property(client, "Enabled") is False
    assert await device_names(client) == ["cryptdata", "cryptroot"]
    problems = await get_property(client, "Problems")
    assert any(str(bad) in p for p in problems), problems


@pytest.mark.asyncio
async def test_bad_toml_error_names_the_line(manager: ProxyInterface, dropins: Path) -> None:
    bad = dropins / "20-y.conf"
    bad.write_text("[cycle]\nfreeze_timeout_sec = 5\nfreeze_timeout_sec = = 6\n")
    err = await reload_error(manager)
    assert err.type == CONFIG_INVALID
    assert err.text.startswith(f"{bad}: invalid TOML: ") and "line 3" in err.text


@pytest.mark.asyncio
async def test_good_change_takes_effect_and_clears_the_problem(
    manager: ProxyInterface, client: MessageBus, dropins: Path
) -> None:
    bad = dropins / "10-x.conf"
    bad.write_text("[prompt]\nretries = 3\n")
    await reload_error(manager)
    bad.write_text(f'enabled = true\n[devices]\nexclude = ["{UUID_B}"]\n')
    await reload(manager)
    assert await get_property(client, "Enabled") is True
    assert await device_names(client) == ["cryptroot"]
    problems = await get_property(client, "Problems")
    assert not any(str(bad) in p for p in problems), problems


@pytest.mark.asyncio
async def test_precedence_through_the_daemon(
    manager: ProxyInterface, client: MessageBus, daemon_root: Path, dropins: Path
) -> None:
    vendor = daemon_root / "usr" / "lib" / "cryptlockd" / "cryptlockd.conf.d"
    vendor.mkdir(parents=True)
    (vendor / "50-vendor.conf").write_text("enabled = true\n")
    await reload(manager)
    assert await get_property(client, "Enabled") is True  # drop-in after the main file
    (dropins / "50-vendor.conf").write_text("")  # masks the vendor file
    await reload(manager)
    assert await get_property(client, "Enabled") is False


@pytest.mark.asyncio
async def test_denied_reload_reads_nothing(
    manager: ProxyInterface, client: MessageBus, polkit: PolkitMock, etc: Path
) -> None:
    polkit.allow()  # nothing allowed any more
    (etc / "cryptlockd.conf").write_text("enabled = true\n")
    assert (await reload_error(manager)).type == "org.cryptlockd1.Error.NotAuthorized"
    assert await get_property(client, "Enabled") is False


@pytest.mark.asyncio
async def test_bad_config_at_start_is_reported(
    system_bus: SystemBus,
    logind: LogindMock,
    polkit: PolkitMock,
    start_daemon: DaemonFactory,
    etc: Path,
    client: MessageBus,
) -> None:
    (etc / "cryptlockd.conf").write_text("[prompt]\nvt = -1\n")
    await asyncio.to_thread(start_daemon)
    problems = await get_property(client, "Problems")
    assert any(f"{etc / 'cryptlockd.conf'}: prompt.vt: " in p for p in problems), problems
    assert await get_property(client, "Protected") is False
