"""The daemon's armer (cryptlockd/daemon/helper_armer.py).

Starting the idle helper: StartUnit must wait until systemd has seen the last helper go.
Until systemd reaps an exited helper its unit is still active, and StartUnit on an active
unit does nothing (the guest showed a sleep right after a cycle going unprotected).

Keeping the RAM filesystem is tests/unit/test_ramfs_keeper.py."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cryptlockd.daemon import helper_armer, helper_socket
from cryptlockd.daemon.armer import ArmOptions
from cryptlockd.daemon.config import Config
from cryptlockd.daemon.helper_armer import HelperArmer, HelperError
from cryptlockd.daemon.ramfs import Ramfs
from cryptlockd.daemon.sleepconf import NoSleepState
from cryptlockd.helper import protocol
from tests.wait import wait_until_async

if TYPE_CHECKING:
    from cryptlockd.helper.protocol import ArmedMessage


class FakeUnit:
    """systemd's view of the helper unit: one state per read, and a change after each."""

    name = "cryptlockd-helper.service"

    def __init__(self, states: list[str]) -> None:
        self.states = states
        self.calls: list[str] = []
        self.reads = 0

    def next_change(self) -> asyncio.Event:
        changed = asyncio.Event()
        if len(self.states) > 1:
            changed.set()  # the state read next differs
        return changed

    async def active_state(self) -> str:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        self.calls.append(state)
        return state

    async def start(self) -> None:
        self.calls.append("StartUnit")

    async def stop(self) -> None:
        self.calls.append("StopUnit")

    async def wait_while(self, states: Collection[str], deadline: float) -> str:
        while (state := await self.active_state()) in states and time.monotonic() < deadline:
            await asyncio.sleep(0)
        return state


def armer(
    tmp_path: Path, fake: FakeUnit, monkeypatch: pytest.MonkeyPatch, alive: bool = False
) -> HelperArmer:
    a = HelperArmer(
        None,  # type: ignore[arg-type]  # the fake unit makes every call
        ramfs=Ramfs(str(tmp_path / "ramfs"), mount=False),
        socket_path=str(tmp_path / "s"),
        under_systemd=True,
    )
    a.unit = fake  # type: ignore[assignment]
    monkeypatch.setattr(helper_socket, "alive", lambda path: alive)
    return a


@pytest.mark.asyncio
async def test_start_waits_until_the_exited_helper_is_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUnit(["active", "active", "deactivating", "inactive"])
    await armer(tmp_path, fake, monkeypatch)._start_unit(time.monotonic() + 5)
    assert fake.calls == ["active", "active", "deactivating", "inactive", "StartUnit"]


@pytest.mark.asyncio
async def test_a_listening_helper_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUnit(["active"])
    await armer(tmp_path, fake, monkeypatch, alive=True)._start_unit(time.monotonic() + 5)
    assert "StartUnit" not in fake.calls


@pytest.mark.asyncio
async def test_a_helper_that_starts_listening_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Type=simple: the unit is active at once, the helper listens a little later, and
    # systemd announces nothing in between. The socket is watched for that.
    fake = FakeUnit(["active"])
    a = armer(tmp_path, fake, monkeypatch)
    looks = iter([False, False, True])
    monkeypatch.setattr(helper_socket, "alive", lambda path: next(looks))
    await a._start_unit(time.monotonic() + 5)
    assert fake.calls == ["active"]


@pytest.mark.asyncio
async def test_a_unit_that_stays_active_without_a_helper_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUnit(["active"])
    with pytest.raises(HelperError, match="still active"):
        await armer(tmp_path, fake, monkeypatch)._start_unit(time.monotonic() + 0.2)
    assert "StartUnit" not in fake.calls


@pytest.mark.asyncio
async def test_after_a_cycle_the_idle_helper_starts_once_the_unit_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUnit(["active", "inactive"])
    a = armer(tmp_path, fake, monkeypatch)
    a.ramfs.size = 1  # a tree to start it from
    monkeypatch.setattr(helper_socket, "alive", lambda path: "StartUnit" in fake.calls)
    await a._prestart(after_exit=True)
    assert fake.calls == ["active", "inactive", "inactive", "StartUnit"]
    assert a._idle_error is None


def test_without_systemd_nothing_is_built_or_armed(tmp_path: Path) -> None:
    a = HelperArmer(
        None,  # type: ignore[arg-type]
        ramfs=Ramfs(str(tmp_path / "ramfs"), mount=False),
        socket_path=str(tmp_path / "s"),
        under_systemd=False,
    )
    a.configure(Config())
    assert a.keeper._task is None
    [line] = a.status()
    assert line.name == "helper" and not line.ok
    assert (
        line.detail == "not running under systemd (no /run/systemd/system): nothing would be wiped"
    )
    with pytest.raises(HelperError, match="not running under systemd"):
        asyncio.run(a.arm([], lambda ok, record: None))


class FakeWriter:
    def __init__(self) -> None:
        self.closed = False

    def close(self) -> None:
        self.closed = True


def armed_future() -> asyncio.Future[ArmedMessage]:
    return asyncio.get_running_loop().create_future()


@pytest.mark.asyncio
async def test_a_helper_that_died_and_was_recovered_is_reported_and_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The helper's connection ends without a record; the recovery (ExecStopPost=) left one
    # before it thawed us. It is the cycle's result, and a fresh helper is started.
    fake = FakeUnit(["deactivating", "failed"])
    a = armer(tmp_path, fake, monkeypatch)
    a.ramfs.size = 1  # a tree to start the fresh helper from
    monkeypatch.setattr(helper_socket, "alive", lambda path: "StartUnit" in fake.calls)
    state = tmp_path / "ramfs" / "state"
    state.mkdir(parents=True)
    reason = "the helper died mid-cycle (killed by SIGKILL); recovered"
    (state / "recovered.json").write_text(json.dumps({"reason": reason}))
    reader = asyncio.StreamReader()
    reader.feed_data(protocol.encode({"op": "armed", "vt": 8, "reserve_kib": 0, "pid": 1}))
    reader.feed_eof()
    got: list[tuple[bool, dict[str, object]]] = []
    writer = FakeWriter()
    armed = armed_future()
    await a._read_helper(reader, writer, lambda ok, rec: got.append((ok, rec)), {}, armed)  # type: ignore[arg-type]
    assert [(ok, rec["reason"]) for ok, rec in got] == [(False, reason)]
    assert armed.result()["vt"] == 8
    assert writer.closed
    assert a._after_helper is not None
    await a._after_helper
    assert fake.calls[-1] == "StartUnit"


@pytest.mark.asyncio
async def test_a_helper_gone_without_any_record_reports_nothing_and_is_replaced(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # It stood down (disarm, or its own armed-idle timeout), or refused the arm: nothing
    # to report, the arm (if still waited for) fails, and an idle helper comes back.
    fake = FakeUnit(["inactive"])
    a = armer(tmp_path, fake, monkeypatch)
    a.ramfs.size = 1
    monkeypatch.setattr(helper_socket, "alive", lambda path: "StartUnit" in fake.calls)
    reader = asyncio.StreamReader()
    reader.feed_data(protocol.encode({"op": "error", "reason": "arming failed: no VT"}))
    reader.feed_eof()
    got: list[bool] = []
    armed = armed_future()
    await a._read_helper(reader, FakeWriter(), lambda ok, rec: got.append(ok), {}, armed)  # type: ignore[arg-type]
    assert got == []
    with pytest.raises(HelperError, match="no VT"):
        armed.result()
    assert a._after_helper is not None
    await a._after_helper
    assert "StartUnit" in fake.calls


class ScriptedHelper:
    """A helper on a real unix socket: answers `arm` with `armed` after `arm_delay`
    seconds, then either stands down on `disarm` or (busy=True, as in a cycle) ignores
    it and sends a record when told."""

    def __init__(
        self,
        path: str,
        arm_delay: float,
        busy: bool = False,
        record: dict[str, object] | None = None,
    ) -> None:
        self.path, self.arm_delay, self.busy = path, arm_delay, busy
        self.got: list[str] = []
        self.arms: list[dict[str, object]] = []
        self.after_arm: list[dict[str, object]] = []
        self.record = record or {}
        self.send_record = asyncio.Event()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, self.path)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        arm = protocol.decode(await reader.readline())
        self.got.append(arm["op"])
        self.arms.append(arm)
        await asyncio.sleep(self.arm_delay)  # a slow arm: mlockall, the KDF reserve
        writer.write(protocol.encode({"op": "armed", "vt": 8, "reserve_kib": 64, "pid": 42}))
        await writer.drain()
        if self.busy:
            await self.send_record.wait()
            record = {"result": "success", "started_boottime": protocol.boottime()}
            record.update(self.record)
            writer.write(protocol.encode({"op": "record", "success": True, "record": record}))
            await writer.drain()
        else:
            msg = protocol.decode(await reader.readline())
            self.got.append(msg["op"])
            self.after_arm.append(dict(msg))
        writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def arm_given_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, helper: ScriptedHelper
) -> tuple[HelperArmer, list[tuple[bool, dict[str, object]]]]:
    """The manager's arm timeout cancels _arm after the helper read `arm`, before it
    answered."""
    a = armer(tmp_path, FakeUnit(["inactive"]), monkeypatch, alive=True)
    monkeypatch.setattr(helper_armer, "choose_sleep_state", lambda: ("mem", None))
    await helper.start()
    got: list[tuple[bool, dict[str, object]]] = []
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(
            a._arm(
                [],
                lambda ok, rec: got.append((ok, rec)),
                t0,
                t0 + 30,
                ArmOptions(steps={"arm_requested": protocol.boottime()}),
            ),
            0.2,
        )
    return a, got


@pytest.mark.asyncio
async def test_a_late_arm_is_cancelled_for_sure(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Issue 10, defect 7: the helper arms just after the manager gave up. disarm() still
    # reaches it on the arm connection, and returns once it has stood down: only then may
    # the manager let logind go on, with the sleep reported unprotected.
    helper = ScriptedHelper(str(tmp_path / "s"), arm_delay=0.4)
    a, got = await arm_given_up(tmp_path, monkeypatch, helper)
    assert await a.disarm() is True
    assert helper.got == ["arm", "disarm"]
    assert got == []
    assert a._conn is None
    helper.close()


@pytest.mark.asyncio
async def test_a_late_arm_that_runs_the_cycle_still_reports_its_record(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The other half of defect 7: should the helper take the sleep all the same (busy,
    # it never reads the disarm), its record is not lost but reported as it is.
    helper = ScriptedHelper(str(tmp_path / "s"), arm_delay=0.4, busy=True)
    a, got = await arm_given_up(tmp_path, monkeypatch, helper)
    monkeypatch.setattr(helper_armer, "DISARM_WAIT", 0.3)
    assert await a.disarm() is False
    helper.send_record.set()
    task = a._reader_task
    assert task is not None
    await asyncio.wait_for(task, 5)
    [(ok, record)] = got
    assert ok and record["result"] == "success"
    assert record["vt"] == 8 and "armed" in record["timeline_ms"]  # type: ignore[operator]
    helper.close()


@pytest.mark.asyncio
async def test_disarm_without_a_connection_is_at_once_true(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = armer(tmp_path, FakeUnit(["inactive"]), monkeypatch)
    assert await a.disarm() is True
    assert a.unit.calls == []  # type: ignore[attr-defined]


@pytest.mark.asyncio
async def test_arm_starts_a_helper_when_none_listens_and_keeps_the_callers_steps(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Nothing listens: the first connection fails, the unit is started (here: the scripted
    # helper starts listening when StartUnit comes), and the arm goes through. The
    # caller's steps, one of them added after arm() returned, reach the record's timeline.
    helper = ScriptedHelper(str(tmp_path / "s"), arm_delay=0.0, busy=True)
    fake = FakeUnit(["inactive"])
    a = armer(tmp_path, fake, monkeypatch)
    a.ramfs.size = 1
    a.keeper.tree_ready.set()
    monkeypatch.setattr(helper_armer, "choose_sleep_state", lambda: ("mem", None))
    real_start = fake.start

    async def start() -> None:
        await real_start()
        await helper.start()

    monkeypatch.setattr(fake, "start", start)
    got: list[tuple[bool, dict[str, object]]] = []
    steps = {"prepare_for_sleep": protocol.boottime()}
    returned = False
    said: list[bool] = []  # on_armed's calls: whether arm() had returned by then
    await a.arm(
        [],
        lambda ok, rec: got.append((ok, rec)),
        ArmOptions(steps=steps, on_armed=lambda: said.append(returned)),
    )
    returned = True
    assert said == [False]  # called by the reader, before arm() returned
    steps["delay_lock_released"] = protocol.boottime()
    assert fake.calls.count("StartUnit") == 1 and helper.got == ["arm"]
    helper.send_record.set()
    assert a._reader_task is not None
    await asyncio.wait_for(a._reader_task, 5)
    [(ok, record)] = got
    assert ok
    timeline = record["timeline_ms"]
    assert isinstance(timeline, dict)
    order = ["prepare_for_sleep", "arm_requested", "arm_sent", "armed", "delay_lock_released"]
    assert [k for k in timeline if k in order] == order
    assert record["arm_seconds"] == round(
        steps["delay_lock_released"] - steps["prepare_for_sleep"], 3
    )
    helper.close()


async def recording_helper(tmp_path: Path) -> tuple[asyncio.Server, list[str]]:
    """A helper socket at the armer's path that answers nothing and notes the op of each
    line it reads."""
    got: list[str] = []

    async def listen(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while line := await reader.readline():
            got.append(protocol.decode(line)["op"])
        writer.close()

    return await asyncio.start_unix_server(listen, str(tmp_path / "s")), got


@pytest.mark.asyncio
async def test_an_arm_given_up_right_after_the_send_disarms_on_the_raw_socket(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The arm is out (sent before any await), and the arm is cancelled while its socket
    # is being handed to asyncio: nobody would read the helper's answer, so the helper is
    # told to stand down on that same socket (issue 10, defect 7).
    server, got = await recording_helper(tmp_path)
    a = armer(tmp_path, FakeUnit(["inactive"]), monkeypatch)
    monkeypatch.setattr(helper_armer, "choose_sleep_state", lambda: ("mem", None))
    handed = asyncio.Event()

    async def never(**kw: object) -> None:
        handed.set()
        await asyncio.Event().wait()

    monkeypatch.setattr(helper_armer.asyncio, "open_unix_connection", never)
    t0 = time.monotonic()
    task = asyncio.ensure_future(
        a._arm([], lambda ok, rec: None, t0, t0 + 30, ArmOptions(steps={"arm_requested": 0.0}))
    )
    await asyncio.wait_for(handed.wait(), 5)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await wait_until_async(lambda: got == ["arm", "disarm"], message="arm, then disarm")
    assert a._conn is None
    server.close()


@pytest.mark.asyncio
async def test_a_stalled_sleep_state_read_is_bounded_by_the_arm_and_sends_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # sleep.conf lives on the root, which may stall: the read runs in a thread, so the
    # manager's bound on the arm still ends it (SPEC 2.8), and no arm goes out.
    server, got = await recording_helper(tmp_path)
    a = armer(tmp_path, FakeUnit(["inactive"]), monkeypatch)
    release = threading.Event()

    def stalled() -> tuple[str, None]:
        release.wait(10)
        return ("mem", None)

    monkeypatch.setattr(helper_armer, "choose_sleep_state", stalled)
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(a._arm([], lambda ok, rec: None, t0, t0 + 30, ArmOptions()), 0.2)
    release.set()
    assert got == [] and a._conn is None
    server.close()


async def armed_with_the_last_state(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read: tuple[str, None] | Exception
) -> tuple[HelperArmer, ScriptedHelper, threading.Event]:
    """Armed for a sleep with ("mem", None) read before; this sleep's read gives `read`
    (or raises it) once the returned event is set."""
    helper = ScriptedHelper(str(tmp_path / "s"), arm_delay=0.0)
    a = armer(tmp_path, FakeUnit(["inactive"]), monkeypatch, alive=True)
    release = threading.Event()

    def slow() -> tuple[str, None]:
        release.wait(10)
        if isinstance(read, Exception):
            raise read
        return read

    monkeypatch.setattr(helper_armer, "choose_sleep_state", slow)
    a._sleep_state = ("mem", None)
    await helper.start()
    t0 = time.monotonic()
    options = ArmOptions(steps={"arm_requested": 0.0}, watchdogs_pending=True)
    await a._arm([], lambda ok, rec: None, t0, t0 + 30, options)
    return a, helper, release


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "read", [("freeze", None), ("mem", None), NoSleepState("none offered")], ids=str
)
async def test_the_arm_goes_out_with_the_last_sleep_state_and_a_change_follows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read: tuple[str, None] | Exception
) -> None:
    # With a sleep state read before, the arm does not wait for this sleep's read (issue
    # 12). A read that differs comes with watchdogs_off(), which the helper waits for
    # before it freezes anything; one that fails leaves the earlier one standing.
    a, helper, release = await armed_with_the_last_state(tmp_path, monkeypatch, read)
    assert helper.got == ["arm"] and helper.arms[0]["sleep_state"] == "mem"
    assert not release.is_set()  # armed while this sleep's read still ran
    release.set()
    await a.watchdogs_off()
    await wait_until_async(lambda: len(helper.after_arm) == 1, message="watchdogs_off")
    if read == ("freeze", None):
        expected: dict[str, object] = {"sleep_state": "freeze", "mem_sleep": None}
    else:
        expected = {}
    assert helper.after_arm == [{"op": "watchdogs_off", **expected}]
    assert a._sleep_state == (read if expected else ("mem", None))
    helper.close()


@pytest.mark.asyncio
async def test_a_stalled_second_read_of_the_sleep_state_holds_watchdogs_off_briefly(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The root stalls under this sleep's read: the helper waits for watchdogs_off before
    # it freezes, so the wait is bounded (SPEC 2.8), and the state read before stands.
    monkeypatch.setattr(helper_armer, "SLEEP_STATE_WAIT", 0.2)
    a, helper, release = await armed_with_the_last_state(tmp_path, monkeypatch, ("freeze", None))
    t1 = time.monotonic()
    await a.watchdogs_off()
    assert time.monotonic() - t1 < 5.0
    release.set()
    await wait_until_async(lambda: len(helper.after_arm) == 1, message="watchdogs_off")
    assert helper.after_arm == [{"op": "watchdogs_off"}]
    assert a._sleep_state == ("mem", None)
    helper.close()
