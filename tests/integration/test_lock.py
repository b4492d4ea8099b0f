"""Lock() on the private bus with the real daemon (its armer records; it pretends to protect)
and dbusmock's logind and polkitd (issue 14, acceptance 3). What the helper does with a
lock runs in the guest: tests/vm/test_lock.py."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
import pytest_asyncio
from dbus_fast.aio import MessageBus, ProxyInterface

from cryptlockd.defs import POLKIT_ACTION_LOCK, POLKIT_ACTION_SUSPEND
from tests.fakesys import FakeSystem
from tests.integration.conftest import Daemon, DaemonFactory, LogindMock, PolkitMock, SystemBus
from tests.integration.support import ctl, dbus_error, get_property, manager_proxy, start_settled
from tests.integration.test_sleep_cycle import armed, state_is, watch_cycle_finished
from tests.wait import wait_until_async

RECORD = {"result": "success", "devices": ["root"], "suspended": ["root"], "action": "suspend"}


@pytest.fixture
def cycle_file(tmp_path: Path) -> Path:
    path = tmp_path / "cycle.json"
    path.write_text(json.dumps({"success": True, "record": RECORD}))
    return path


@pytest.fixture
def daemon(
    logind: LogindMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    cycle_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> Daemon:
    monkeypatch.setenv("RECORDING_ARMER_PROTECTS", "1")
    monkeypatch.setenv("RECORDING_ARMER_CYCLE_FILE", str(cycle_file))
    monkeypatch.setenv("RECORDING_ARMER_FAIL_FILE", str(tmp_path / "fail"))
    monkeypatch.setenv("RECORDING_ARMER_LOCK_HOLD_FILE", str(tmp_path / "hold"))
    return start_settled(start_daemon, logind, *luks_system.daemon_args())


@pytest_asyncio.fixture
async def manager(client: MessageBus) -> ProxyInterface:
    return await manager_proxy(client)


async def protected(client: MessageBus) -> None:
    await wait_until_async(lambda: get_property(client, "Protected"), message="Protected")


@pytest.mark.asyncio
async def test_lock_runs_the_cycle_and_reports_a_lock(
    daemon: Daemon, polkit: PolkitMock, manager: ProxyInterface, client: MessageBus
) -> None:
    await protected(client)
    seen = await watch_cycle_finished(client)
    polkit.allow(POLKIT_ACTION_LOCK)
    await manager.call_lock()  # type: ignore[attr-defined]
    await wait_until_async(lambda: seen, message="CycleFinished")
    [(success, record)] = seen
    # The helper's record, marked as a lock's whatever it said.
    assert success is True and record["action"] == "lock" and record["suspended"] == ["root"]
    await wait_until_async(lambda: state_is(client, "idle"), message="State back to idle")
    assert (await get_property(client, "LastCycle"))["action"].value == "lock"
    assert "lock requested by" in daemon.log()
    assert "armed with sleeps=False" in daemon.log()


@pytest.mark.asyncio
async def test_lock_refused_changes_nothing(
    daemon: Daemon,
    logind: LogindMock,
    polkit: PolkitMock,
    manager: ProxyInterface,
    client: MessageBus,
    system_bus: SystemBus,
) -> None:
    await protected(client)
    seen = await watch_cycle_finished(client)
    # polkit says no: the suspend action is not the lock's.
    polkit.allow(POLKIT_ACTION_SUSPEND)
    e = await dbus_error(manager.call_lock())  # type: ignore[attr-defined]
    assert (e.type, str(e.text)) == (
        "org.cryptlockd1.Error.NotAuthorized",
        f"not authorized for {POLKIT_ACTION_LOCK}",
    )
    out = await asyncio.to_thread(ctl, system_bus, "lock")
    assert (out.returncode, out.stdout, out.stderr.strip()) == (
        1,
        "",
        "cryptlockctl: Lock failed: org.cryptlockd1.Error.NotAuthorized: "
        f"not authorized for {POLKIT_ACTION_LOCK}",
    )
    # A sleep under way: busy.
    polkit.allow(POLKIT_ACTION_LOCK)
    await armed(logind, client)
    e = await dbus_error(manager.call_lock())  # type: ignore[attr-defined]
    assert e.type == "org.cryptlockd1.Error.Busy"
    assert await state_is(client, "armed")
    assert seen == [] and "lock requested by" not in daemon.log()


@pytest.mark.asyncio
async def test_lock_when_not_protected_is_refused(
    logind: LogindMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    polkit: PolkitMock,
    manager: ProxyInterface,
    client: MessageBus,
) -> None:
    await asyncio.to_thread(start_settled, start_daemon, logind, *luks_system.daemon_args())
    polkit.allow(POLKIT_ACTION_LOCK)
    e = await dbus_error(manager.call_lock())  # type: ignore[attr-defined]
    assert e.type == "org.cryptlockd1.Error.NotProtected"
    assert await state_is(client, "idle")


@pytest.mark.asyncio
async def test_a_lock_that_cannot_arm_fails_and_says_why(
    daemon: Daemon,
    polkit: PolkitMock,
    manager: ProxyInterface,
    client: MessageBus,
    tmp_path: Path,
) -> None:
    await protected(client)
    seen = await watch_cycle_finished(client)
    (tmp_path / "fail").write_text("the helper did not start")
    polkit.allow(POLKIT_ACTION_LOCK)
    e = await dbus_error(manager.call_lock())  # type: ignore[attr-defined]
    assert (e.type, str(e.text)) == (
        "org.cryptlockd1.Error.LockFailed",
        "cannot lock: the helper did not start",
    )
    await wait_until_async(lambda: seen, message="CycleFinished")
    [(success, record)] = seen
    assert success is False and record["action"] == "lock" and record["result"] == "failed"
    assert record["reason"] == "cannot lock: the helper did not start"
    assert await state_is(client, "idle")
    # And the next lock works.
    (tmp_path / "fail").unlink()
    await manager.call_lock()  # type: ignore[attr-defined]
    await wait_until_async(lambda: len(seen) == 2, message="the second CycleFinished")
    assert seen[1][0] is True


@pytest.mark.asyncio
async def test_while_locked_sleeps_and_locks_are_not_armed_for(
    daemon: Daemon,
    logind: LogindMock,
    polkit: PolkitMock,
    manager: ProxyInterface,
    client: MessageBus,
    tmp_path: Path,
) -> None:
    await protected(client)
    seen = await watch_cycle_finished(client)
    (tmp_path / "hold").touch()  # the "helper" sits at its prompt
    polkit.allow(POLKIT_ACTION_LOCK, POLKIT_ACTION_SUSPEND)
    await manager.call_lock()  # type: ignore[attr-defined]
    assert await state_is(client, "locked")
    for call in (manager.call_lock, manager.call_suspend):  # type: ignore[attr-defined]
        assert (await dbus_error(call())).type == "org.cryptlockd1.Error.Busy"
    # A sleep logind begins meanwhile: not armed for, logind let go, the lock goes on.
    logind.prepare_for_sleep(True)
    await wait_until_async(lambda: not logind.our_inhibitors(), message="logind let go")
    logind.prepare_for_sleep(False)
    await wait_until_async(logind.our_inhibitors, message="the inhibitor taken again")
    assert await state_is(client, "locked") and seen == []
    assert "a sleep during a Lock(): not armed for" in daemon.log()
    (tmp_path / "hold").unlink()
    await wait_until_async(lambda: seen, message="CycleFinished")
    assert seen[0][0] is True and seen[0][1]["action"] == "lock"
    await wait_until_async(lambda: state_is(client, "idle"), message="State back to idle")
    assert daemon.log().count("recording armer: armed with") == 1
