"""The daemon's sleep-cycle logic with the bus replaced by a recorder: arming closes the
inhibitor fd, a failing or slow armer still lets the sleep go ahead (fd closed, logged),
the cycle record becomes LastCycle and CycleFinished, and a sleep without a cycle disarms."""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, Variant

from cryptlockd.bus import to_variant
from cryptlockd.daemon.armer import CycleCallback
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.daemon.helper_armer import HelperArmer
from cryptlockd.daemon.main import Manager, parse_args
from cryptlockd.daemon.notify import Notifier
from cryptlockd.daemon.ramfs import Ramfs
from cryptlockd.defs import State
from cryptlockd.errors import CryptlockdError
from tests.fakesys import FakeSystem, plain_luks2
from tests.integration.recording_daemon import RecordingArmer
from tests.unit.test_helper_armer import FakeUnit


class FakeBus:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    def signals(self, member: str) -> list[Message]:
        return [m for m in self.sent if m.member == member]


class FailingArmer(RecordingArmer):
    async def arm(self, devices: Sequence[LuksDevice], on_finished: CycleCallback) -> None:
        raise CryptlockdError("helper did not start")


class HangingArmer(RecordingArmer):
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
    m = Manager(bus, args, armer, Notifier(None, None))  # type: ignore[arg-type]
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
    tmp_path: Path, caplog: pytest.LogCaptureFixture, armer_cls: type[RecordingArmer]
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


def test_the_armer_status_is_the_helper_line(tmp_path: Path) -> None:
    m, _bus = make_manager(tmp_path, RecordingArmer())
    m.refresh()
    assert not m.protected
    assert "helper: armer 'recording' only records the cycle: nothing would be wiped" in m.problems


def test_without_systemd_the_helper_armer_says_why(tmp_path: Path) -> None:
    ramfs = Ramfs(str(tmp_path / "ramfs"), mount=False)
    armer = HelperArmer(FakeBus(), ramfs=ramfs, under_systemd=False)  # type: ignore[arg-type]
    m, _bus = make_manager(tmp_path, armer)
    m.refresh()
    assert not m.protected
    assert (
        "helper: not running under systemd (no /run/systemd/system): nothing would be wiped"
        in m.problems
    )
    assert not any(p.startswith("helper-ramfs") for p in m.problems)
    assert not (tmp_path / "ramfs").exists()  # nothing was built


class SlowRamfs(Ramfs):
    """Builds when told to, in the builder thread."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), mount=False)
        self.go = threading.Event()

    def current(self) -> bool:
        return self.size > 0

    def ensure(self) -> bool:
        assert self.go.wait(10)
        self.size = 30 * 2**20
        return True


@pytest.mark.asyncio
async def test_the_finished_build_refreshes_protected_without_a_poll(tmp_path: Path) -> None:
    ramfs = SlowRamfs(tmp_path / "ramfs")
    armer = HelperArmer(
        FakeBus(),  # type: ignore[arg-type]
        ramfs=ramfs,
        socket_path=str(tmp_path / "s"),
        under_systemd=True,
    )
    unit = FakeUnit(["inactive"])
    armer.unit = unit  # type: ignore[assignment]
    refreshed = asyncio.Event()
    m, bus = make_manager(tmp_path, armer)  # configure() starts the build
    m._started = True
    assert "helper-ramfs: the helper's RAM filesystem: not built yet" in m.problems
    real_refresh = m.refresh

    def refresh() -> None:
        real_refresh()
        refreshed.set()

    armer.watch(refresh)
    ramfs.go.set()
    await asyncio.wait_for(refreshed.wait(), 10)
    assert not any(p.startswith("helper-ramfs") for p in m.problems), m.problems
    [ok] = [r for r in m.check_results if r.name == "helper-ramfs"]
    assert ok.ok and "30.0 MiB" in ok.detail
    assert any("Problems" in sig.body[1] for sig in bus.signals("PropertiesChanged"))
    # And then the idle helper is started ahead of the next sleep.
    assert armer._prestart_task is not None
    await asyncio.wait_for(armer._prestart_task, 10)
    assert unit.calls[-1] == "StartUnit"
