"""Suspend() with the caller's rights (issue 10, defect 8): the real daemon checks its caller
against logind's polkit actions and block inhibitors before it asks logind, and asks with
SuspendWithFlags(SD_LOGIND_ROOT_CHECK_INHIBITORS). logind and polkitd are python-dbusmock's;
the daemon's armer pretends to protect, so that Suspend() gets past "not protected".
(An unprivileged user's active session on a real logind: tests/vm/test_suspend_rights.py.)"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator

import pytest
import pytest_asyncio
from dbus_fast.aio import MessageBus, ProxyInterface

from cryptlockd.defs import (
    LOGIND_MANAGER_INTERFACE,
    LOGIND_ROOT_CHECK_INHIBITORS,
    POLKIT_ACTION_LOGIN1_SUSPEND,
    POLKIT_ACTION_LOGIN1_SUSPEND_MULTIPLE_SESSIONS,
    POLKIT_ACTION_SUSPEND,
)
from tests.fakesys import FakeSystem
from tests.integration.conftest import Daemon, DaemonFactory, LogindMock, PolkitMock, SystemBus
from tests.integration.support import ctl, dbus_error, get_property, manager_proxy, start_settled
from tests.wait import wait_until_async

INHIBITED = "org.cryptlockd1.Error.Inhibited"
NOT_AUTHORIZED = "org.cryptlockd1.Error.NotAuthorized"


@pytest.fixture
def logind_with_flags(logind: LogindMock) -> LogindMock:
    # The template knows only the old Suspend(b).
    logind.mock("AddMethod", LOGIND_MANAGER_INTERFACE, "SuspendWithFlags", "t", "", "")
    return logind


@pytest.fixture
def daemon(
    logind_with_flags: LogindMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    monkeypatch: pytest.MonkeyPatch,
) -> Daemon:
    monkeypatch.setenv("RECORDING_ARMER_PROTECTS", "1")
    return start_settled(start_daemon, logind_with_flags, *luks_system.daemon_args())


@pytest_asyncio.fixture
async def manager(client: MessageBus) -> ProxyInterface:
    return await manager_proxy(client)


class Lock:
    """A package manager's block inhibitor, held until release() (the template says uid
    1000, pid 123456 for every inhibitor)."""

    def __init__(self, logind: LogindMock) -> None:
        unix_fd = logind.call("Inhibit", "sleep:shutdown", "apt", "upgrading packages", "block")
        self.fd: int | None = unix_fd.take()

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None


@pytest.fixture
def block_inhibitor(logind_with_flags: LogindMock) -> Iterator[Lock]:
    lock = Lock(logind_with_flags)
    yield lock
    lock.release()


def suspends(logind: LogindMock) -> list[int]:
    return [int(args[0]) for _ts, args in logind.method_calls("SuspendWithFlags")]


def asked(polkit: PolkitMock) -> list[str]:
    return [str(args[1]) for _ts, args in polkit.method_calls("CheckAuthorization")]


async def protected(client: MessageBus) -> None:
    await wait_until_async(
        lambda: get_property(client, "Protected"), message="the daemon says Protected"
    )


@pytest.mark.asyncio
async def test_allowed_caller_suspends_with_inhibitors_checked(
    daemon: Daemon,
    logind_with_flags: LogindMock,
    polkit: PolkitMock,
    manager: ProxyInterface,
    client: MessageBus,
) -> None:
    await protected(client)
    polkit.allow(POLKIT_ACTION_SUSPEND)
    # Our action alone is not enough any more: logind's own is asked too.
    e = await dbus_error(manager.call_suspend())  # type: ignore[attr-defined]
    assert (e.type, str(e.text)) == (
        NOT_AUTHORIZED,
        f"not authorized for {POLKIT_ACTION_LOGIN1_SUSPEND}",
    )
    assert suspends(logind_with_flags) == []

    polkit.allow(POLKIT_ACTION_SUSPEND, POLKIT_ACTION_LOGIN1_SUSPEND)
    await manager.call_suspend()  # type: ignore[attr-defined]
    assert suspends(logind_with_flags) == [LOGIND_ROOT_CHECK_INHIBITORS]
    assert logind_with_flags.method_calls("Suspend") == []
    assert asked(polkit)[-2:] == [POLKIT_ACTION_SUSPEND, POLKIT_ACTION_LOGIN1_SUSPEND]


@pytest.mark.asyncio
async def test_a_block_inhibitor_refuses_and_is_named(
    daemon: Daemon,
    logind_with_flags: LogindMock,
    polkit: PolkitMock,
    manager: ProxyInterface,
    client: MessageBus,
    block_inhibitor: Lock,
    system_bus: SystemBus,
) -> None:
    await protected(client)
    polkit.allow(POLKIT_ACTION_SUSPEND, POLKIT_ACTION_LOGIN1_SUSPEND)
    e = await dbus_error(manager.call_suspend())  # type: ignore[attr-defined]
    assert e.type == INHIBITED
    assert str(e.text) == (
        "a block inhibitor holds off sleep: 'apt' (pid 123456, uid 1000): upgrading packages"
    )
    assert suspends(logind_with_flags) == []
    # Refused before polkit was asked about logind's actions.
    assert POLKIT_ACTION_LOGIN1_SUSPEND not in asked(polkit)

    # cryptlockctl: one line, exit 1, naming it.
    proc = await asyncio.to_thread(ctl, system_bus, "suspend")
    assert proc.returncode == 1
    assert proc.stderr == (
        f"cryptlockctl: Suspend failed: {INHIBITED}: a block inhibitor holds off sleep: "
        "'apt' (pid 123456, uid 1000): upgrading packages\n"
    )
    assert suspends(logind_with_flags) == []

    # The inhibitor gone, the same call goes through.
    block_inhibitor.release()
    await wait_until_async(
        lambda: not [i for i in logind_with_flags.list_inhibitors() if str(i[3]) == "block"],
        message="the block inhibitor released",
    )
    await manager.call_suspend()  # type: ignore[attr-defined]
    assert suspends(logind_with_flags) == [LOGIND_ROOT_CHECK_INHIBITORS]


@pytest.mark.asyncio
async def test_another_users_session_asks_for_multiple_sessions(
    daemon: Daemon,
    logind_with_flags: LogindMock,
    polkit: PolkitMock,
    manager: ProxyInterface,
    client: MessageBus,
) -> None:
    await protected(client)
    logind_with_flags.mock("AddSession", "c2", "seat0", 4321, "alice", True)
    polkit.allow(POLKIT_ACTION_SUSPEND, POLKIT_ACTION_LOGIN1_SUSPEND)
    e = await dbus_error(manager.call_suspend())  # type: ignore[attr-defined]
    assert e.type == NOT_AUTHORIZED
    assert POLKIT_ACTION_LOGIN1_SUSPEND_MULTIPLE_SESSIONS in str(e.text)
    polkit.allow(POLKIT_ACTION_SUSPEND, POLKIT_ACTION_LOGIN1_SUSPEND_MULTIPLE_SESSIONS)
    await manager.call_suspend()  # type: ignore[attr-defined]
    assert suspends(logind_with_flags) == [LOGIND_ROOT_CHECK_INHIBITORS]


@pytest.mark.asyncio
async def test_logind_refusing_for_an_inhibitor_is_inhibited(
    daemon: Daemon,
    logind_with_flags: LogindMock,
    polkit: PolkitMock,
    manager: ProxyInterface,
    client: MessageBus,
) -> None:
    """An inhibitor taken between the check and the call: logind's own refusal."""
    await protected(client)
    logind_with_flags.mock(
        "AddMethod",
        LOGIND_MANAGER_INTERFACE,
        "SuspendWithFlags",
        "t",
        "",
        "raise dbus.exceptions.DBusException('Operation denied due to active block inhibitor',"
        " name='org.freedesktop.login1.BlockedByInhibitorLock')",
    )
    polkit.allow(POLKIT_ACTION_SUSPEND, POLKIT_ACTION_LOGIN1_SUSPEND)
    e = await dbus_error(manager.call_suspend())  # type: ignore[attr-defined]
    assert (e.type, str(e.text)) == (
        INHIBITED,
        "logind refused: Operation denied due to active block inhibitor",
    )
