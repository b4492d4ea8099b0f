"""The daemon's armer (cryptlockd/daemon/helper_armer.py).

Starting the idle helper: StartUnit must wait until systemd has seen the last helper go.
Until systemd reaps an exited helper its unit is still active, and StartUnit on an active
unit does nothing (the guest showed a sleep right after a cycle going unprotected).

Keeping the RAM filesystem is tests/unit/test_ramfs_keeper.py."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cryptlockd.daemon import helper_socket
from cryptlockd.daemon.config import Config
from cryptlockd.daemon.helper_armer import HelperArmer, HelperError
from cryptlockd.daemon.ramfs import Ramfs

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
    reader.feed_eof()
    got: list[tuple[bool, dict[str, object]]] = []
    armed: ArmedMessage = {"op": "armed", "vt": 8, "reserve_kib": 0, "pid": 1}
    await a._await_record(reader, lambda ok, rec: got.append((ok, rec)), {}, armed)
    assert [(ok, rec["reason"]) for ok, rec in got] == [(False, reason)]
    assert fake.calls[-1] == "StartUnit"


@pytest.mark.asyncio
async def test_a_helper_gone_without_any_record_reports_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a = armer(tmp_path, FakeUnit(["inactive"]), monkeypatch)
    reader = asyncio.StreamReader()
    reader.feed_eof()
    got: list[bool] = []
    armed: ArmedMessage = {"op": "armed", "vt": 8, "reserve_kib": 0, "pid": 1}
    await a._await_record(reader, lambda ok, rec: got.append(ok), {}, armed)
    assert got == []
