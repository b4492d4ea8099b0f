"""The daemon's state machine around one sleep, on the private bus with the real daemon
(RecordingArmer) and dbusmock's logind (issue 10, defects 5-7): no way out of `armed` is
missed, and a sleep the helper did not run ends in LastCycle and CycleFinished as
unprotected, with its reason, and in Problems."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, MessageType
from dbus_fast.aio import MessageBus

from cryptlockd.daemon import sleep_report
from cryptlockd.defs import (
    BUS_NAME,
    LOGIND_MANAGER_INTERFACE,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    POLKIT_ACTION_SUSPEND,
    PROPERTIES_INTERFACE,
)
from cryptlockd.helper import protocol
from tests.fakesys import FakeSystem
from tests.integration.conftest import Daemon, DaemonFactory, LogindMock, PolkitMock
from tests.integration.support import (
    bus_daemon,
    call,
    error_name,
    get_property,
    message,
    start_settled,
)
from tests.wait import wait_until_async


async def watch_cycle_finished(bus: MessageBus) -> list[tuple[bool, dict[str, Any]]]:
    """The daemon's CycleFinished signals from now on, unwrapped."""
    seen: list[tuple[bool, dict[str, Any]]] = []

    def handler(msg: Message) -> None:
        if (
            msg.message_type == MessageType.SIGNAL
            and msg.member == "CycleFinished"
            and msg.interface == MANAGER_INTERFACE
        ):
            seen.append((msg.body[0], {k: v.value for k, v in msg.body[1].items()}))

    bus.add_message_handler(handler)
    rule = f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',member='CycleFinished'"
    await bus_daemon(bus, "AddMatch", "s", rule)
    return seen


async def state_is(client: MessageBus, state: str) -> bool:
    return bool(await get_property(client, "State") == state)


async def armed(logind: LogindMock, client: MessageBus) -> None:
    logind.prepare_for_sleep(True)
    await wait_until_async(lambda: state_is(client, "armed"), message="State armed")
    await wait_until_async(lambda: not logind.our_inhibitors(), message="lock released")


async def reported_unprotected(
    client: MessageBus, seen: list[tuple[bool, dict[str, Any]]], reason: str
) -> dict[str, Any]:
    """Back to idle, one CycleFinished(false) with `reason`, the same in LastCycle, and a
    Problems line that names it."""
    await wait_until_async(lambda: state_is(client, "idle"), message="State back to idle")
    await wait_until_async(lambda: seen, message="CycleFinished")
    [(success, record)] = seen
    assert success is False and record["result"] == "unprotected", record
    assert record["reason"].startswith(reason), record
    last = await get_property(client, "LastCycle")
    assert last["reason"].value == record["reason"]
    problems = await get_property(client, "Problems")
    assert f"last-cycle: the last sleep was NOT protected: {record['reason']}" in problems
    return record


@pytest.fixture
def daemon(logind: LogindMock, start_daemon: DaemonFactory, luks_system: FakeSystem) -> Daemon:
    return start_settled(start_daemon, logind, *luks_system.daemon_args())


@pytest.mark.asyncio
async def test_logind_restarted_while_armed(
    logind: LogindMock, daemon: Daemon, client: MessageBus
) -> None:
    # Defect 5: a restarted logind never sends PrepareForSleep(false). Before, the daemon
    # stayed armed and ignored the next PrepareForSleep(true).
    seen = await watch_cycle_finished(client)
    await armed(logind, client)
    await asyncio.to_thread(logind.restart)
    await reported_unprotected(client, seen, "logind left the bus before the sleep ended")
    await wait_until_async(logind.our_inhibitors, message="lock taken from the new logind")
    await armed(logind, client)  # the next sleep is armed for
    assert "while armed; ignored" not in daemon.log()


@pytest.mark.asyncio
async def test_prepare_for_sleep_false_without_a_cycle(
    logind: LogindMock, daemon: Daemon, client: MessageBus
) -> None:
    # hybrid-sleep, suspend-then-hibernate: logind ends the sleep, no cycle ran.
    seen = await watch_cycle_finished(client)
    await armed(logind, client)
    logind.prepare_for_sleep(False)
    await reported_unprotected(client, seen, sleep_report.NO_CYCLE)
    await wait_until_async(logind.our_inhibitors, message="lock taken again")


@pytest.mark.asyncio
async def test_a_sleep_that_never_ends_ends_at_the_deadline(
    logind: LogindMock, start_daemon: DaemonFactory, luks_system: FakeSystem, client: MessageBus
) -> None:
    await asyncio.to_thread(
        start_settled, start_daemon, logind, *luks_system.daemon_args(), "--sleep-deadline", "1"
    )
    seen = await watch_cycle_finished(client)
    await armed(logind, client)
    await reported_unprotected(client, seen, "the sleep had not ended 1 s after")
    await wait_until_async(logind.our_inhibitors, message="lock taken again")


@pytest.mark.asyncio
async def test_an_arm_failure_and_the_stock_fallback(
    logind: LogindMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    daemon_root: Path,
    tmp_path: Path,
    client: MessageBus,
) -> None:
    fail = tmp_path / "fail"
    fail.write_text("the helper did not start")
    await asyncio.to_thread(
        start_daemon, *luks_system.daemon_args(), env={"RECORDING_ARMER_FAIL_FILE": str(fail)}
    )
    await wait_until_async(logind.our_inhibitors, message="daemon took its inhibitor")
    seen = await watch_cycle_finished(client)
    logind.prepare_for_sleep(True)
    # The lock goes at once (the machine still sleeps, unprotected); no arming state stays.
    await wait_until_async(lambda: not logind.our_inhibitors(), message="lock released")
    await wait_until_async(lambda: state_is(client, "idle"), message="nothing armed")
    # The sleep entry found nothing armed and ran the stock sleep: its trace.
    trace = daemon_root / protocol.STOCK_SLEEP_TRACE.lstrip("/")
    trace.parent.mkdir(parents=True, exist_ok=True)
    trace.write_text(json.dumps({"reason": "no cryptlockd helper is armed", "boottime": 1e9}))
    logind.prepare_for_sleep(False)
    record = await reported_unprotected(
        client, seen, "cannot arm the helper: the helper did not start"
    )
    assert record["problems"][0] == (
        "the sleep entry ran the stock systemd-sleep: no cryptlockd helper is armed"
    )
    assert record["slept"] is True and not trace.exists()


@pytest.mark.asyncio
async def test_a_stock_sleep_while_the_daemon_was_down_is_reported_at_start(
    logind: LogindMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    daemon_root: Path,
    client: MessageBus,
) -> None:
    trace = daemon_root / protocol.STOCK_SLEEP_TRACE.lstrip("/")
    trace.parent.mkdir(parents=True)
    trace.write_text(json.dumps({"reason": "no cryptlockd helper is armed", "boottime": 12.5}))
    await asyncio.to_thread(start_settled, start_daemon, logind, *luks_system.daemon_args())
    last = await get_property(client, "LastCycle")
    assert last["result"].value == "unprotected"
    assert last["reason"].value == (
        "the sleep entry ran the stock systemd-sleep: no cryptlockd helper is armed"
    )
    problems = await get_property(client, "Problems")
    assert any(p.startswith("last-cycle: the last sleep was NOT protected") for p in problems)
    assert not trace.exists()


@pytest.mark.asyncio
async def test_a_second_sleep_request_during_a_sleep(
    logind: LogindMock, polkit: PolkitMock, daemon: Daemon, client: MessageBus
) -> None:
    seen = await watch_cycle_finished(client)
    await armed(logind, client)
    # Suspend() during the sleep: refused, nothing asked of logind.
    polkit.allow(POLKIT_ACTION_SUSPEND)
    reply = await call(client, message("Suspend"))
    assert error_name(reply) == "org.cryptlockd1.Error.Busy"
    assert logind.method_calls("Suspend") == []
    # A second PrepareForSleep(true) (its first end lost): armed again, not ignored.
    logind.prepare_for_sleep(True)
    await wait_until_async(
        lambda: "PrepareForSleep(true) before the last sleep ended" in daemon.log(),
        message="the second PrepareForSleep(true) handled",
    )
    await wait_until_async(lambda: state_is(client, "armed"), message="armed again")
    logind.prepare_for_sleep(False)
    await reported_unprotected(client, seen, sleep_report.NO_CYCLE)
    await wait_until_async(logind.our_inhibitors, message="lock taken again")
    await armed(logind, client)


@pytest.mark.asyncio
async def test_a_sleep_under_way_at_start_is_joined(
    logind: LogindMock, start_daemon: DaemonFactory, luks_system: FakeSystem, client: MessageBus
) -> None:
    # The daemon restarted while armed: logind still waits for the sleep it began.
    logind.call(
        "Set", LOGIND_MANAGER_INTERFACE, "PreparingForSleep", True, interface=PROPERTIES_INTERFACE
    )
    d = await asyncio.to_thread(start_daemon, *luks_system.daemon_args())
    await wait_until_async(lambda: state_is(client, "armed"), message="armed for it")
    assert "a sleep is under way" in d.log()
    await wait_until_async(lambda: not logind.our_inhibitors(), message="lock released")
