"""cryptlockd-notify against the real daemon (private system bus) and a REAL notification
server (dunst under Xvfb, on a private session bus): a verified cycle, an unprotected one
and Protected turning false each show the right notification, once; a forged
CycleFinished shows nothing; the agent outlives the daemon restarting and a missing
notification server (issue 15, acceptance 2 and 3)."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cryptlockd.defs import (
    MANAGER_INTERFACE,
    OBJECT_PATH,
    POLKIT_ACTION_CONFIGURE,
)
from cryptlockd.desktop.messages import NEXT_SLEEP_SUMMARY, WIPED_SUMMARY
from tests.fakesys import FakeSystem
from tests.integration.conftest import (
    REPO,
    VENV_PYTHON,
    Daemon,
    DaemonFactory,
    LoggedProcess,
    LogindMock,
    PolkitMock,
    Reporter,
    SystemBus,
)
from tests.integration.desktop_session import Desktop, Shown, needs_desktop
from tests.wait import GiveUp, wait_until

FAILED_SUMMARY = "This sleep was NOT protected: freezing the cgroups timed out"


@pytest.fixture
def desktop(tmp_path: Path, _reporter: Reporter) -> Iterator[Desktop]:
    d = Desktop(tmp_path / "desktop", _reporter)
    yield d
    d.close()


class Sleeps:
    """The daemon with a recording armer that reports whatever cycle the test sets."""

    def __init__(
        self, start_daemon: DaemonFactory, luks_system: FakeSystem, logind: LogindMock, d: Path
    ) -> None:
        self.cycle_file = d / "cycle.json"
        self.start_daemon = start_daemon
        self.luks_system = luks_system
        self.logind = logind

    def daemon(self) -> Daemon:
        env = {"RECORDING_ARMER_PROTECTS": "1", "RECORDING_ARMER_CYCLE_FILE": str(self.cycle_file)}
        d = self.start_daemon(*self.luks_system.daemon_args(), env=env)
        wait_until(self.logind.our_inhibitors, message="inhibitor taken")
        return d

    def sleep(self, success: bool, record: dict[str, Any]) -> None:
        """One PrepareForSleep(true)/(false) whose "helper" reports this record."""
        self.cycle_file.write_text(json.dumps({"success": success, "record": record}))
        self.logind.prepare_for_sleep(True)
        self.logind.prepare_for_sleep(False)


def verified(*devices: str) -> dict[str, Any]:
    return {"result": "success", "devices": list(devices), "suspended": list(devices)}


def failed() -> dict[str, Any]:
    return {"result": "failed", "reason": "freezing the cgroups timed out", "devices": ["root"]}


def wait_shown(desktop: Desktop, summary: str, count: int = 1) -> list[Shown]:
    def seen() -> list[Shown]:
        if desktop.dunst is not None and not desktop.dunst.alive():
            raise GiveUp(f"dunst exited: {desktop.dunst.log()}")
        found = [s for s in desktop.shown() if s.summary == summary]
        return found if len(found) >= count else []

    return wait_until(seen, 20, message=f"dunst showed {summary!r} {count} time(s)")


def wait_agent_log(agent: LoggedProcess, text: str, count: int = 1) -> None:
    def seen() -> bool:
        if not agent.alive():
            raise GiveUp(f"cryptlockd-notify exited: {agent.log()}")
        return agent.log().count(text) >= count

    wait_until(seen, 20, message=f"cryptlockd-notify logged {text!r} {count} time(s)")


def set_enabled(system_bus: SystemBus, enabled: bool) -> None:
    import dbus

    obj = system_bus.conn.get_object("org.cryptlockd1", OBJECT_PATH, introspect=False)
    obj.SetEnabled(dbus.Boolean(enabled), dbus_interface=MANAGER_INTERFACE, timeout=20)


def forge_cycle_finished(system_bus: SystemBus, agent_pid: int) -> None:
    """A CycleFinished sent straight to the agent's unique name by a connection that is
    not the daemon's: what any local user can do."""
    import dbus.lowlevel

    conn = system_bus.conn
    bus = conn.get_object("org.freedesktop.DBus", "/org/freedesktop/DBus")
    names = [str(n) for n in bus.ListNames(dbus_interface="org.freedesktop.DBus")]
    [unique] = [
        n
        for n in names
        if n.startswith(":")
        and bus.GetConnectionUnixProcessID(n, dbus_interface="org.freedesktop.DBus") == agent_pid
    ]
    msg = dbus.lowlevel.SignalMessage(OBJECT_PATH, MANAGER_INTERFACE, "CycleFinished")
    msg.set_destination(unique)
    msg.append(
        dbus.Boolean(True),
        dbus.Dictionary({"devices": dbus.Array(["forged0"], signature="s")}, signature="sv"),
        signature="ba{sv}",
    )
    conn.send_message(msg)
    conn.flush()


@needs_desktop
def test_notifications_from_a_real_server(
    system_bus: SystemBus,
    logind: LogindMock,
    polkit: PolkitMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    desktop: Desktop,
    tmp_path: Path,
) -> None:
    sleeps = Sleeps(start_daemon, luks_system, logind, tmp_path)
    first = sleeps.daemon()
    desktop.start_dunst()
    agent = desktop.start_agent(system_bus)
    wait_agent_log(agent, "cryptlockd is on the system bus")

    forge_cycle_finished(system_bus, agent.pid)
    sleeps.sleep(True, verified("root"))
    [wiped] = wait_shown(desktop, WIPED_SUMMARY)
    assert (wiped.appname, wiped.body, wiped.urgency) == ("cryptlockd", "Devices: root", "NORMAL")

    sleeps.sleep(False, failed())
    [unprotected] = wait_shown(desktop, FAILED_SUMMARY)
    assert unprotected.urgency == "CRITICAL"

    polkit.allow(POLKIT_ACTION_CONFIGURE)
    set_enabled(system_bus, False)
    [warning] = wait_shown(desktop, NEXT_SLEEP_SUMMARY)
    assert "protection disabled" in warning.body and warning.urgency == "CRITICAL"

    # The daemon restarts: the agent follows the new owner and reads its properties again
    # (the new daemon starts enabled, so Protected is true: no warning for that).
    first.stop()
    wait_agent_log(agent, "cryptlockd left the system bus")
    sleeps.daemon()
    wait_agent_log(agent, "cryptlockd is on the system bus", count=2)
    sleeps.sleep(True, verified("root", "home"))
    wait_shown(desktop, WIPED_SUMMARY, count=2)
    set_enabled(system_bus, False)
    wait_shown(desktop, NEXT_SLEEP_SUMMARY, count=2)

    shown = desktop.shown()
    assert [s.body for s in shown if s.summary == WIPED_SUMMARY] == [
        "Devices: root",
        "Devices: root, home",
    ]
    # Once per turn to false, and never the forged cycle.
    assert [s.summary for s in shown].count(NEXT_SLEEP_SUMMARY) == 2
    assert not [s for s in shown if "forged0" in s.body]
    assert agent.alive()


@needs_desktop
def test_waits_for_a_notification_server(
    system_bus: SystemBus,
    logind: LogindMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
    desktop: Desktop,
    tmp_path: Path,
) -> None:
    sleeps = Sleeps(start_daemon, luks_system, logind, tmp_path)
    sleeps.daemon()
    agent = desktop.start_agent(system_bus)
    wait_agent_log(agent, "cryptlockd is on the system bus")
    sleeps.sleep(False, failed())
    wait_agent_log(agent, "waiting for a notification server")
    # The server comes later (a session whose notification daemon starts late, or crashed).
    desktop.start_dunst()
    [shown] = wait_shown(desktop, FAILED_SUMMARY)
    assert shown.urgency == "CRITICAL"
    assert agent.alive()


@needs_desktop
def test_one_agent_per_session(
    system_bus: SystemBus, logind: LogindMock, start_daemon: DaemonFactory, desktop: Desktop
) -> None:
    """Started both by the user unit and by XDG autostart, the second one leaves."""
    start_daemon()
    first = desktop.start_agent(system_bus)
    wait_agent_log(first, "cryptlockd is on the system bus")
    second = desktop.start_agent(system_bus)
    wait_until(lambda: not second.alive(), 20, message="the second agent exits")
    assert second.proc.returncode == 0, second.log()
    assert "another cryptlockd-notify runs in this session" in second.log()
    assert first.alive()


def test_no_session_bus_is_one_line_and_exit_1(system_bus: SystemBus, tmp_path: Path) -> None:
    env = system_bus.env({"DBUS_SESSION_BUS_ADDRESS": f"unix:path={tmp_path / 'none'}"})
    proc = subprocess.run(
        [str(VENV_PYTHON), "-m", "cryptlockd.desktop"],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        cwd=str(REPO),
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("cryptlockd-notify: cannot connect to the session bus: ")
    assert proc.stderr.count("\n") == 1, proc.stderr
