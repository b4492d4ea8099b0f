"""The daemon's sleep-cycle logic with the bus replaced by a recorder: arming closes the
inhibitor fd, a failing or slow armer still lets the sleep go ahead (fd closed, logged),
the cycle record becomes LastCycle and CycleFinished, and a sleep without a cycle disarms."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, Variant

from cryptlockd.bus import to_variant
from cryptlockd.daemon.armer import CycleCallback, RecordingArmer
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.daemon.main import Manager, parse_args
from cryptlockd.daemon.notify import Notifier
from cryptlockd.defs import State
from cryptlockd.errors import CryptlockdError
from tests.fakesys import FakeSystem, plain_luks2


class FakeBus:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def signals(self, member: str) -> list[Message]:
        return [m for m in self.sent if m.member == member]


class FailingArmer:
    async def arm(self, devices: Sequence[LuksDevice], on_finished: CycleCallback) -> None:
        raise CryptlockdError("helper did not start")

    async def disarm(self) -> None:
        pass


class HangingArmer(FailingArmer):
    async def arm(self, devices: Sequence[LuksDevice], on_finished: CycleCallback) -> None:
        await asyncio.sleep(3600)


def make_manager(tmp_path: Path, armer: Any) -> tuple[Manager, FakeBus]:
    fs = FakeSystem(tmp_path / "fake")
    plain_luks2(fs)
    root = tmp_path / "root"
    (root / "etc" / "cryptlockd").mkdir(parents=True)
    (root / "etc" / "cryptlockd" / "cryptlockd.conf").write_text("[cycle]\narm_timeout_sec = 0.3\n")
    bus = FakeBus()
    args = parse_args(["--root", str(root), *fs.daemon_args()])
    m = Manager(bus, args, armer, "helper", Notifier(None, None))  # type: ignore[arg-type]
    m.load_config()
    m.load_devices()
    assert [d.name for d in m.devices] == ["cryptroot"]
    return m, bus


def hold_fake_inhibitor(m: Manager) -> int:
    """A pipe stands in for logind's fd: its read end sees EOF once we close ours."""
    r, w = os.pipe()
    m.logind.owner = ":1.1"
    m.logind.inhibitor_fd = w
    return r


def closed(read_end: int) -> bool:
    os.set_blocking(read_end, False)
    try:
        return os.read(read_end, 1) == b""
    except BlockingIOError:  # the write end is still open somewhere
        return False


@pytest.mark.asyncio
async def test_arm_then_resume_without_cycle_disarms(tmp_path: Path) -> None:
    armer = RecordingArmer()
    m, _bus = make_manager(tmp_path, armer)
    r = hold_fake_inhibitor(m)
    await m.prepare_for_sleep(True)
    assert armer.armed_with == [("cryptroot",)]
    assert m.state == State.ARMED
    assert closed(r) and m.logind.inhibitor_fd is None
    m.logind.owner = None  # no logind to ask for a new lock in this test
    await m.prepare_for_sleep(False)
    assert armer.disarmed == 1
    assert m.state == State.IDLE


@pytest.mark.asyncio
async def test_cycle_record_becomes_last_cycle_and_signal(tmp_path: Path) -> None:
    armer = RecordingArmer()
    m, bus = make_manager(tmp_path, armer)
    m._started = True
    hold_fake_inhibitor(m)
    await m.prepare_for_sleep(True)
    record = {
        "result": "success",
        "devices": ["cryptroot"],
        "steps": {"freeze": 1.5},
        "verified": True,
        "started_usec": 123,
    }
    m.cycle_finished(True, record)
    [sig] = bus.signals("CycleFinished")
    assert sig.signature == "ba{sv}"
    assert sig.body[0] is True
    assert sig.body[1]["steps"] == Variant("a{sv}", {"freeze": Variant("d", 1.5)})
    changed = [m_.body[1] for m_ in bus.signals("PropertiesChanged")]
    assert any("LastCycle" in c for c in changed)
    assert m.get_property("LastCycle")["result"] == Variant("s", "success")
    m.logind.owner = None
    await m.prepare_for_sleep(False)
    assert armer.disarmed == 0  # a cycle came: nothing to stand down
    assert m.state == State.IDLE


@pytest.mark.asyncio
@pytest.mark.parametrize("armer_cls", [FailingArmer, HangingArmer])
async def test_failed_arm_still_releases_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, armer_cls: type[FailingArmer]
) -> None:
    m, _bus = make_manager(tmp_path, armer_cls())
    r = hold_fake_inhibitor(m)
    with caplog.at_level(logging.WARNING):
        await asyncio.wait_for(m.prepare_for_sleep(True), 10)
    assert closed(r) and m.logind.inhibitor_fd is None
    assert m.state == State.IDLE
    assert any(
        rec.levelno == logging.CRITICAL and "NOT protected" in rec.getMessage()
        for rec in caplog.records
    )


@pytest.mark.asyncio
async def test_disabled_sleeps_unprotected_at_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    armer = RecordingArmer()
    m, _bus = make_manager(tmp_path, armer)
    m.enabled = False
    r = hold_fake_inhibitor(m)
    with caplog.at_level(logging.WARNING):
        await m.prepare_for_sleep(True)
    assert armer.armed_with == []
    assert closed(r)
    assert "NOT protected" in caplog.text


def test_to_variant_shapes() -> None:
    assert to_variant(True) == Variant("b", True)
    assert to_variant(3) == Variant("x", 3)
    assert to_variant(["a", "b"]) == Variant("as", ["a", "b"])
    assert to_variant([1, "a"]) == Variant("av", [Variant("x", 1), Variant("s", "a")])
    assert to_variant({"k": {"n": 1.0}}) == Variant(
        "a{sv}", {"k": Variant("a{sv}", {"n": Variant("d", 1.0)})}
    )


class RamfsArmer(RecordingArmer):
    def __init__(self) -> None:
        super().__init__()
        self.status = (False, "not built yet")

    def ramfs_status(self) -> tuple[bool, str]:
        return self.status


@pytest.mark.asyncio
async def test_ramfs_status_reaches_problems_when_it_changes(tmp_path: Path) -> None:
    armer = RamfsArmer()
    m, _bus = make_manager(tmp_path, armer)
    m.refresh()
    assert "helper-ramfs: the helper's RAM filesystem: not built yet" in m.problems
    watch = asyncio.get_running_loop().create_task(m.watch_ramfs(interval=0.01))
    try:
        armer.status = (True, "/run/cryptlockd/ramfs: 30.0 MiB")
        deadline = asyncio.get_running_loop().time() + 10
        while any(p.startswith("helper-ramfs") for p in m.problems):
            assert asyncio.get_running_loop().time() < deadline, m.problems
            await asyncio.sleep(0.01)
    finally:
        watch.cancel()
