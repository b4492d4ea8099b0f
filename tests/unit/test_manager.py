"""The daemon's state and sleep-cycle logic (cryptlockd/daemon/manager.py), with the bus
replaced by a recorder: arming closes the inhibitor fd, a failing or slow armer still lets
the sleep go ahead (fd closed, logged), the cycle record becomes LastCycle and
CycleFinished, a sleep without a cycle disarms, and every change is announced once."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from dbus_fast import Message, Variant

from cryptlockd.daemon.armer import Armer, ArmOptions, CycleCallback
from cryptlockd.daemon.checks import CheckResult
from cryptlockd.daemon.config import Config
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.daemon.helper_armer import HelperArmer
from cryptlockd.daemon.main import manager_for, parse_args
from cryptlockd.daemon.manager import Manager
from cryptlockd.daemon.notify import Notifier
from cryptlockd.daemon.ramfs import Ramfs
from cryptlockd.daemon.service import Service
from cryptlockd.defs import ERR_SERVICE_UNKNOWN, State
from cryptlockd.errors import CryptlockdError
from tests.fakesys import FakeSystem, plain_luks2
from tests.integration.recording_daemon import RecordingArmer
from tests.unit.test_helper_armer import FakeUnit


class FakeBus:
    def __init__(self) -> None:
        self.sent: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sent.append(msg)

    async def call(self, msg: Message) -> Message | None:
        """Calls out (systemd's ServiceWatchdogs): answered as on a bus without systemd."""
        self.sent.append(msg)
        msg.serial = len(self.sent)  # as a connection numbers what it sends
        return Message.new_error(msg, ERR_SERVICE_UNKNOWN, "no systemd on this bus")

    def signals(self, member: str) -> list[Message]:
        return [m for m in self.sent if m.member == member]


class FailingArmer(RecordingArmer):
    async def arm(
        self,
        devices: Sequence[LuksDevice],
        on_finished: CycleCallback,
        options: ArmOptions | None = None,
    ) -> None:
        raise CryptlockdError("helper did not start")


class HangingArmer(RecordingArmer):
    async def arm(
        self,
        devices: Sequence[LuksDevice],
        on_finished: CycleCallback,
        options: ArmOptions | None = None,
    ) -> None:
        await asyncio.sleep(3600)


def make_manager(tmp_path: Path, armer: Armer) -> tuple[Manager, FakeBus]:
    """A manager on a fake machine with one LUKS2 root, shown by a Service on a FakeBus."""
    fs = FakeSystem(tmp_path / "fake")
    plain_luks2(fs)
    root = tmp_path / "root"
    (root / "etc" / "cryptlockd").mkdir(parents=True)
    (root / "etc" / "cryptlockd" / "cryptlockd.conf").write_text("[cycle]\narm_timeout_sec = 0.3\n")
    bus: Any = FakeBus()
    m = manager_for(
        parse_args(["--root", str(root), *fs.daemon_args()]), bus, armer, Notifier(None, None)
    )
    Service(bus, m, polkit_timeout=1.0)
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


def changed_names(bus: FakeBus) -> list[list[str]]:
    return [sorted(sig.body[1]) for sig in bus.signals("PropertiesChanged")]


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
    assert any("LastCycle" in c for c in changed_names(bus))
    assert m.listener.snapshot()["LastCycle"]["result"] == Variant("s", "success")
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


def test_changing_announces_once_with_the_changed_names(tmp_path: Path) -> None:
    m, bus = make_manager(tmp_path, RecordingArmer())
    m._started = True
    with m.changing():
        m.enabled = False  # Enabled, and through the checks Problems
        with m.changing():  # nested: announced with the outer one
            m.state = State.ARMING
        assert bus.signals("PropertiesChanged") == []
    assert changed_names(bus) == [["Enabled", "Problems", "State"]]
    [sig] = bus.signals("PropertiesChanged")
    assert sig.body[1]["State"] == Variant("s", "arming")
    m.refresh()  # nothing changed: nothing announced
    assert len(bus.signals("PropertiesChanged")) == 1


def test_changing_announces_even_when_the_change_raises(tmp_path: Path) -> None:
    m, bus = make_manager(tmp_path, RecordingArmer())
    m._started = True
    with pytest.raises(RuntimeError), m.changing():
        m.enabled = False
        raise RuntimeError("half-way")
    assert changed_names(bus) == [["Enabled", "Problems"]]


def test_the_sleeps_own_states_are_announced_without_running_the_checks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    m, bus = make_manager(tmp_path, RecordingArmer())
    m._started = True
    m.refresh()
    runs: list[int] = []
    real = m.run_checks
    monkeypatch.setattr(m, "run_checks", lambda: runs.append(1) or real())
    m.set_state(State.ARMING, evaluate=False)
    m.set_state(State.ARMED, evaluate=False)
    assert runs == []  # what they read cannot change while a sleep is armed
    assert [sig.body[1]["State"] for sig in bus.signals("PropertiesChanged")] == [
        Variant("s", "arming"),
        Variant("s", "armed"),
    ]
    # A nested change that asks for the checks gets them, and the next one runs them.
    with m.changing(evaluate=False), m.changing():
        m.enabled = False
    assert runs == [1] and "Enabled" in changed_names(bus)[-1]
    m.set_state(State.IDLE)
    assert runs == [1, 1]


def test_nothing_is_announced_before_start(tmp_path: Path) -> None:
    m, bus = make_manager(tmp_path, RecordingArmer())
    m.set_state(State.ARMING)
    assert bus.sent == []


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
    """No tree at start; builds when told to, in the builder thread."""

    def __init__(self, path: Path) -> None:
        super().__init__(str(path), mount=False)
        self.go = threading.Event()

    def load(self) -> bool:
        return self.size > 0

    def current(self) -> bool:
        return self.size > 0

    def manifest(self) -> dict[str, object] | None:
        return {"inputs": []} if self.size else None

    def stage(self) -> dict[str, object]:
        assert self.go.wait(10)
        return {}

    def staged_current(self) -> bool:
        return True

    def swap_in(self) -> None:
        self.size = 30 * 2**20


class ListeningUnit(FakeUnit):
    """StartUnit starts a "helper": something listens on the socket."""

    def __init__(self, socket_path: Path) -> None:
        super().__init__(["inactive"])
        self.socket_path = socket_path
        self.listener: socket.socket | None = None

    async def start(self) -> None:
        await super().start()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.socket_path))
        self.listener.listen()


@pytest.mark.asyncio
async def test_the_finished_build_refreshes_protected_without_a_poll(tmp_path: Path) -> None:
    ramfs = SlowRamfs(tmp_path / "ramfs")
    armer = HelperArmer(
        FakeBus(),  # type: ignore[arg-type]
        ramfs=ramfs,
        socket_path=str(tmp_path / "s"),
        under_systemd=True,
    )
    unit = ListeningUnit(tmp_path / "s")
    armer.unit = unit  # type: ignore[assignment]
    refreshed = asyncio.Event()
    m, bus = make_manager(tmp_path, armer)
    m._started = True
    armer.configure(m.config)  # in the loop: the build starts
    m.refresh()
    assert "helper-ramfs: the helper's RAM filesystem: not built yet" in m.problems
    real_refresh = m.refresh

    def refresh() -> None:
        real_refresh()
        refreshed.set()

    armer.watch(refresh)
    ramfs.go.set()
    await asyncio.wait_for(refreshed.wait(), 10)
    # And then the idle helper is started ahead of the next sleep: the start-up is over.
    await asyncio.wait_for(armer.ready(), 10)
    assert not any(p.startswith("helper-ramfs") for p in m.problems), m.problems
    [ok] = [r for r in m.check_results if r.name == "helper-ramfs"]
    assert ok.ok and "30.0 MiB" in ok.detail
    assert any("Problems" in c for c in changed_names(bus))
    assert unit.calls[-1] == "StartUnit"
    assert unit.listener is not None
    unit.listener.close()


def test_recording_armer_is_an_armer() -> None:
    armer: Armer = RecordingArmer()
    armer.configure(Config())
    assert [r.name for r in armer.status()] == ["helper"]
    assert isinstance(armer.status()[0], CheckResult)


class LateArmer(RecordingArmer):
    """Ready when told."""

    def __init__(self) -> None:
        super().__init__()
        self.go = asyncio.Event()

    async def ready(self) -> None:
        await self.go.wait()


@pytest.fixture
def late(tmp_path: Path) -> tuple[Manager, FakeBus, LateArmer]:
    """A manager whose armer is ready when told."""
    armer = LateArmer()
    m, bus = make_manager(tmp_path, armer)
    return m, bus, armer


@pytest.mark.asyncio
async def test_wait_ready_returns_once_the_armer_is_ready(
    late: tuple[Manager, FakeBus, LateArmer],
) -> None:
    m, _bus, armer = late
    waiting = asyncio.get_running_loop().create_task(m.wait_ready(10))
    await asyncio.sleep(0.1)
    assert not waiting.done()
    armer.go.set()
    assert await asyncio.wait_for(waiting, 5) is True
    assert m.not_ready is None


@pytest.mark.asyncio
async def test_wait_ready_is_bounded_and_problems_say_so_until_ready(
    late: tuple[Manager, FakeBus, LateArmer], caplog: pytest.LogCaptureFixture
) -> None:
    m, bus, armer = late
    m._started = True
    with caplog.at_level(logging.WARNING):
        assert await m.wait_ready(0.1) is False
    assert "ready: the sleep-cycle helper was not ready 0.1 s after start" in m.problems
    assert "ready although the next sleep may not be protected" in caplog.text
    [line] = [r for r in m.check_results if r.name == "ready"]
    assert not line.blocking
    armer.go.set()
    await asyncio.sleep(0.05)
    assert m.not_ready is None
    assert not any(p.startswith("ready:") for p in m.problems)
    assert any("Problems" in c for c in changed_names(bus))
