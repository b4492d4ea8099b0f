"""The real daemon turns systemd's ServiceWatchdogs off when it arms and back when the sleep
is over, restores it at start after a crash mid-cycle, and leaves a user's "off" alone
(issue 10, defect 5). PID 1 is python-dbusmock's systemd template here; that PID 1 then
spares the frozen services is shown in the guest (tests/vm/test_watchdogs.py)."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptlockd.daemon.service_watchdogs import PROPERTY, STATE_FILE
from cryptlockd.defs import SYSTEMD_BUS_NAME, SYSTEMD_MANAGER_INTERFACE, SYSTEMD_PATH
from tests.fakesys import FakeSystem
from tests.integration.conftest import (
    DaemonFactory,
    DBusMock,
    LogindMock,
    Reporter,
    SystemBus,
)
from tests.integration.support import start_settled
from tests.wait import wait_until_async


class SystemdMock(DBusMock):
    template = "systemd"
    bus_name = SYSTEMD_BUS_NAME
    path = SYSTEMD_PATH
    interface = SYSTEMD_MANAGER_INTERFACE

    def after_start(self) -> None:
        import dbus

        self.mock("AddProperty", SYSTEMD_MANAGER_INTERFACE, PROPERTY, dbus.Boolean(True))

    @property
    def watchdogs(self) -> bool:
        return bool(
            self.call(
                "Get",
                SYSTEMD_MANAGER_INTERFACE,
                PROPERTY,
                interface="org.freedesktop.DBus.Properties",
            )
        )

    @watchdogs.setter
    def watchdogs(self, value: bool) -> None:
        import dbus

        self.call(
            "Set",
            SYSTEMD_MANAGER_INTERFACE,
            PROPERTY,
            dbus.Boolean(value, variant_level=1),
            interface="org.freedesktop.DBus.Properties",
        )

    def sets(self) -> list[bool]:
        """Every Set of the property so far, from the mock's log (GetMethodCalls does not
        record the Properties interface)."""
        marker = f"Set {SYSTEMD_PATH} {SYSTEMD_MANAGER_INTERFACE}.{PROPERTY} "
        log = self.proc.log() if self.proc else ""
        return [
            line.split(marker)[1].strip() == "True" for line in log.splitlines() if marker in line
        ]


@pytest.fixture
def systemd(system_bus: SystemBus, _reporter: Reporter) -> Iterator[SystemdMock]:
    mock = SystemdMock(system_bus, _reporter)
    yield mock
    mock.stop()


def note(daemon_root: Path) -> Path:
    return daemon_root / STATE_FILE.lstrip("/")


async def until_watchdogs(systemd: SystemdMock, value: bool, message: str) -> None:
    await wait_until_async(lambda: systemd.watchdogs is value, message=message)


@pytest.mark.asyncio
async def test_off_while_armed_back_on_when_resumed(
    logind: LogindMock,
    systemd: SystemdMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    daemon_root: Path,
) -> None:
    start_settled(start_daemon, logind, *luks_system.daemon_args())
    logind.prepare_for_sleep(True)
    await until_watchdogs(systemd, False, "ServiceWatchdogs off once armed")
    # Off before the delay lock went: the freeze cannot come first.
    assert note(daemon_root).read_text() == "yes\n"
    logind.prepare_for_sleep(False)
    await until_watchdogs(systemd, True, "ServiceWatchdogs back on after the sleep")
    await wait_until_async(lambda: not note(daemon_root).exists(), message="note removed")
    assert systemd.sets() == [False, True]


@pytest.mark.asyncio
async def test_a_daemon_killed_while_armed_restores_them_when_it_starts_again(
    logind: LogindMock,
    systemd: SystemdMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    daemon_root: Path,
) -> None:
    d = start_settled(start_daemon, logind, *luks_system.daemon_args())
    logind.prepare_for_sleep(True)
    await until_watchdogs(systemd, False, "ServiceWatchdogs off once armed")
    d.proc.send_signal(signal.SIGKILL)
    await asyncio.to_thread(d.proc.wait, 10)
    assert systemd.watchdogs is False and note(daemon_root).exists()
    await asyncio.to_thread(start_daemon, *luks_system.daemon_args())
    await until_watchdogs(systemd, True, "restored at start")
    assert not note(daemon_root).exists()


@pytest.mark.asyncio
async def test_a_users_off_stays_off(
    logind: LogindMock,
    systemd: SystemdMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    daemon_root: Path,
) -> None:
    systemd.watchdogs = False  # systemctl service-watchdogs no
    start_settled(start_daemon, logind, *luks_system.daemon_args())
    logind.prepare_for_sleep(True)
    await wait_until_async(lambda: not logind.our_inhibitors(), message="armed")
    logind.prepare_for_sleep(False)
    await wait_until_async(logind.our_inhibitors, message="resumed: inhibitor taken again")
    assert systemd.watchdogs is False
    assert systemd.sets() == [False]  # the test's own, none of the daemon's
    assert not note(daemon_root).exists()
