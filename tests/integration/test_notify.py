"""sd_notify: READY, STATUS, watchdog pings and STOPPING reach NOTIFY_SOCKET; SIGTERM is a
clean shutdown; the notify variables do not stay in the environment. READY waits for the
armer (the helper's RAM filesystem and idle helper), for a bounded time."""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptlockd.daemon.notify import SLEEP_WATCHDOG_USEC, Notifier
from cryptlockd.defs import BUS_NAME, MANAGER_INTERFACE, OBJECT_PATH, PROPERTIES_INTERFACE
from cryptlockd.run import child_env
from tests.fakesys import FakeSystem
from tests.integration.conftest import Daemon, DaemonFactory, LogindMock, SystemBus
from tests.wait import wait_until


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)
        self.messages: list[dict[str, str]] = []

    def drain(self) -> list[dict[str, str]]:
        while True:
            try:
                data = self.sock.recv(65536)
            except BlockingIOError:
                return self.messages
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if line)
            self.messages.append(fields)

    def seen(self, key: str, value: str | None = None) -> list[dict[str, str]]:
        return [m for m in self.drain() if key in m and (value is None or m[key] == value)]


@pytest.fixture
def listener(tmp_path: Path) -> Iterator[NotifyListener]:
    nl = NotifyListener(tmp_path / "notify.sock")
    yield nl
    nl.sock.close()


def test_ready_status_watchdog_stopping(
    system_bus: SystemBus,
    logind: LogindMock,
    start_daemon: DaemonFactory,
    listener: NotifyListener,
) -> None:
    d = start_daemon(env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "200000"})
    [ready] = wait_until(lambda: listener.seen("READY", "1"), message="READY=1")
    assert ready.get("STATUS"), ready
    # Pings at half of WATCHDOG_USEC: several within a second.
    wait_until(lambda: len(listener.seen("WATCHDOG", "1")) >= 3, message="WATCHDOG=1 pings")
    d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(20)
    assert d.proc.returncode == 0, d.log()
    assert listener.seen("STOPPING", "1"), listener.messages
    # A clean shutdown gives the name back and drops the lock.
    assert not system_bus.name_has_owner(BUS_NAME)
    wait_until(lambda: not logind.our_inhibitors(), message="inhibitor released on exit")
    assert "STOPPING" in d.log()


def test_watchdog_for_another_pid_is_ignored(
    system_bus: SystemBus,
    logind: LogindMock,
    start_daemon: DaemonFactory,
    listener: NotifyListener,
) -> None:
    d = start_daemon(
        env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "100000", "WATCHDOG_PID": "1"}
    )
    wait_until(lambda: listener.seen("READY", "1"), message="READY=1")
    # A round trip, so the loop has run well past where the first ping would go out.
    obj = system_bus.conn.get_object(BUS_NAME, OBJECT_PATH, introspect=False)
    obj.Check(dbus_interface=MANAGER_INTERFACE, timeout=20)
    d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(20)
    assert listener.seen("STOPPING", "1")
    assert not listener.seen("WATCHDOG")


def test_watchdog_stretched_across_a_sleep(
    system_bus: SystemBus,
    logind: LogindMock,
    start_daemon: DaemonFactory,
    listener: NotifyListener,
    luks_system: FakeSystem,
) -> None:
    # The helper freezes us (and PID 1) until the passphrase is typed: systemd must not
    # find us overdue on thaw.
    start_daemon(
        *luks_system.daemon_args(),
        env={"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": "20000000"},
    )
    wait_until(lambda: listener.seen("READY", "1"), message="READY=1")
    wait_until(logind.our_inhibitors, message="inhibitor taken")
    logind.prepare_for_sleep(True)
    wait_until(
        lambda: listener.seen("WATCHDOG_USEC", str(SLEEP_WATCHDOG_USEC)),
        message="watchdog stretched for the sleep",
    )
    logind.prepare_for_sleep(False)
    wait_until(
        lambda: listener.seen("WATCHDOG_USEC", "20000000"),
        message="watchdog restored after the sleep",
    )


def test_notify_variables_leave_the_environment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "1000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    n = Notifier.from_environment()
    assert n.enabled and n.watchdog_usec == 1_000_000
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"):
        assert var not in os.environ
    # And run()'s children never get it even if something put it back.
    monkeypatch.setenv("NOTIFY_SOCKET", "/run/systemd/notify")
    assert "NOTIFY_SOCKET" not in child_env()


def problems(system_bus: SystemBus) -> list[str]:
    obj = system_bus.conn.get_object(BUS_NAME, OBJECT_PATH, introspect=False)
    value = obj.Get(MANAGER_INTERFACE, "Problems", dbus_interface=PROPERTIES_INTERFACE, timeout=20)
    return [str(p) for p in value]


class LateStart:
    """start_daemon(*args) with NOTIFY_SOCKET, and an armer ready only once armer_ready()
    is called (RECORDING_ARMER_READY_FILE)."""

    def __init__(self, start_daemon: DaemonFactory, listener: NotifyListener, tmp: Path) -> None:
        self.start_daemon = start_daemon
        self.listener = listener
        self.ready_file = tmp / "armer-ready"

    def __call__(self, *args: str) -> Daemon:
        env = {
            "NOTIFY_SOCKET": str(self.listener.path),
            "RECORDING_ARMER_READY_FILE": str(self.ready_file),
        }
        return self.start_daemon(*args, env=env)

    def armer_ready(self) -> None:
        self.ready_file.touch()


@pytest.fixture
def start_late(
    logind: LogindMock, start_daemon: DaemonFactory, listener: NotifyListener, tmp_path: Path
) -> LateStart:
    return LateStart(start_daemon, listener, tmp_path)


def test_ready_waits_for_the_armer(
    system_bus: SystemBus, start_late: LateStart, listener: NotifyListener
) -> None:
    start_late()
    # On the bus and saying what it waits for, but not READY: the next sleep would not be
    # protected yet.
    wait_until(lambda: listener.seen("STATUS", "Starting: preparing the sleep-cycle helper"))
    problems(system_bus)  # a round trip: the daemon serves while it waits
    assert not listener.seen("READY")
    start_late.armer_ready()
    wait_until(lambda: listener.seen("READY", "1"), message="READY=1 once the armer is ready")
    assert not any(p.startswith("ready:") for p in problems(system_bus))


def test_ready_after_a_bounded_wait_with_problems_saying_why(
    system_bus: SystemBus, start_late: LateStart, listener: NotifyListener
) -> None:
    d = start_late("--ready-timeout", "0.5")
    wait_until(lambda: listener.seen("READY", "1"), message="READY=1 after the bounded wait")
    assert "ready: the sleep-cycle helper was not ready 0.5 s after start" in problems(system_bus)
    assert "ready although the next sleep may not be protected" in d.log()
    start_late.armer_ready()
    wait_until(
        lambda: not any(p.startswith("ready:") for p in problems(system_bus)),
        message="the ready problem gone once the armer is ready",
    )
