"""cryptlockctl against the real daemon on a private bus: every subcommand, --json, exit
codes, and the message when no daemon runs."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from cryptlockd import __version__
from cryptlockd.cli.output import format_devices
from cryptlockd.defs import (
    BUS_NAME,
    INTROSPECTION_XML,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    POLKIT_ACTION_CONFIGURE,
    POLKIT_ACTION_SUSPEND,
    PROPERTIES_INTERFACE,
    STATUS_SCHEMA,
    STATUS_SCHEMA_VERSION,
)
from tests.fakesys import UUID_A, UUID_B, FakeSystem, two_disks_keyfile
from tests.integration.conftest import (
    REPO,
    Daemon,
    DaemonFactory,
    LogindMock,
    PolkitMock,
    SystemBus,
)
from tests.integration.support import CTL, ctl, start_settled, unique_name_of
from tests.wait import GiveUp, wait_until

NOT_RUNNING = (
    "cryptlockctl: cryptlockd is not running (org.cryptlockd1 has no owner on the system bus)\n"
)
SUBCOMMANDS = ["status", "devices", "check", "suspend", "enable", "disable", "reload", "monitor"]


def ctl_json(bus: SystemBus, *args: str) -> Any:
    proc = ctl(bus, *args, "--json")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    return json.loads(proc.stdout)


@pytest.fixture
def fake(tmp_path: Path) -> FakeSystem:
    fs = FakeSystem(tmp_path / "fake")
    two_disks_keyfile(fs)
    return fs


@pytest.fixture
def daemon(
    system_bus: SystemBus,
    logind: LogindMock,
    polkit: PolkitMock,
    start_daemon: DaemonFactory,
    fake: FakeSystem,
) -> Daemon:
    return start_settled(start_daemon, logind, *fake.daemon_args())


def bus_property(bus: SystemBus, name: str) -> Any:
    obj = bus.conn.get_object(BUS_NAME, OBJECT_PATH)
    return obj.Get(MANAGER_INTERFACE, name, dbus_interface=PROPERTIES_INTERFACE, timeout=10)


def test_not_running_every_subcommand(system_bus: SystemBus) -> None:
    for sub in SUBCOMMANDS:
        for extra in ([], ["--json"]):
            proc = ctl(system_bus, sub, *extra)
            assert (proc.returncode, proc.stdout, proc.stderr) == (1, "", NOT_RUNNING), sub


def test_no_system_bus_at_all(system_bus: SystemBus, tmp_path: Path) -> None:
    proc = ctl(
        system_bus, "status", env={"DBUS_SYSTEM_BUS_ADDRESS": f"unix:path={tmp_path}/nothing"}
    )
    assert proc.returncode == 1
    assert proc.stderr.startswith("cryptlockctl: cannot connect to the system bus: ")
    assert proc.stderr.count("\n") == 1


@pytest.mark.parametrize(
    "args",
    [
        [],
        ["bogus"],
        ["status", "extra"],
        ["enable", "now"],
        ["--timeout", "-1", "status"],
        ["status", "--timeout", "x"],
        ["--jsonx", "status"],
    ],
)
def test_usage_errors_exit_2(system_bus: SystemBus, args: list[str]) -> None:
    proc = ctl(system_bus, *args)
    assert proc.returncode == 2, proc
    assert "usage: cryptlockctl" in proc.stderr
    assert proc.stdout == ""


def test_help_and_version(system_bus: SystemBus) -> None:
    proc = ctl(system_bus, "--help")
    assert proc.returncode == 0
    for sub in SUBCOMMANDS:
        assert sub in proc.stdout
    proc = ctl(system_bus, "--version")
    assert (proc.returncode, proc.stdout.strip()) == (0, f"cryptlockctl {__version__}")


def test_status(system_bus: SystemBus, daemon: Daemon) -> None:
    status = ctl_json(system_bus, "status")
    jsonschema.validate(status, json.loads(STATUS_SCHEMA.read_text()))
    assert status.pop("SchemaVersion") == STATUS_SCHEMA_VERSION
    xml = INTROSPECTION_XML.read_text()
    assert set(status) == {
        p
        for p in ("Version", "Enabled", "Protected", "Problems", "State", "Devices", "LastCycle")
        if f'name="{p}"' in xml
    }
    assert status["Version"] == __version__
    assert status["Enabled"] is True
    assert status["State"] == "idle"
    assert status["Protected"] == bool(bus_property(system_bus, "Protected"))
    assert status["Problems"] == [str(p) for p in bus_property(system_bus, "Problems")]
    assert [d["name"] for d in status["Devices"]] == ["cryptdata", "cryptroot"]
    assert status["LastCycle"] == {}

    proc = ctl(system_bus, "status")
    assert proc.returncode == 0 and proc.stderr == ""
    lines = proc.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines if not ln.startswith(" ")] == [
        "Protected",
        "Problems",
        "State",
        "Enabled",
        "Devices",
        "Last cycle",
        "Version",
    ]
    text = proc.stdout
    assert f"Protected:  {'yes' if status['Protected'] else 'no'}\n" in text
    assert "Devices:    2 (cryptdata, cryptroot)\n" in text
    assert "State:      idle\n" in text
    assert "Last cycle: none yet\n" in text
    for problem in status["Problems"]:
        assert problem in text


def test_devices(system_bus: SystemBus, daemon: Daemon) -> None:
    devices = ctl_json(system_bus, "devices")
    by = {d["name"]: d for d in devices}
    assert by["cryptroot"] == {
        "name": "cryptroot",
        "uuid": UUID_A,
        "luks_type": "LUKS2",
        "backing_device": "/dev/vda2",
        "holds_root": True,
        "suspended": False,
        "key_source": "passphrase",
        "holders": [],
    }
    assert by["cryptdata"]["key_source"] == "keyfile:/etc/keys/data.key"
    assert by["cryptdata"]["uuid"] == UUID_B

    # Named devices go through GetDevice.
    assert ctl_json(system_bus, "devices", "cryptdata") == [by["cryptdata"]]

    # The text is the table of what the daemon sent (its columns: tests/unit/test_cli_output).
    proc = ctl(system_bus, "devices")
    assert (proc.returncode, proc.stdout) == (0, format_devices(devices) + "\n")
    assert [ln.split()[0] for ln in proc.stdout.splitlines()] == ["NAME", "cryptdata", "cryptroot"]


def test_devices_unknown_name(system_bus: SystemBus, daemon: Daemon) -> None:
    proc = ctl(system_bus, "devices", "nosuch")
    assert proc.returncode == 1
    assert proc.stdout == ""
    assert proc.stderr.startswith(
        "cryptlockctl: GetDevice failed: org.cryptlockd1.Error.NoSuchDevice: "
    )
    assert proc.stderr.count("\n") == 1


def test_check(system_bus: SystemBus, daemon: Daemon) -> None:
    proc = ctl(system_bus, "check", "--json")
    results = json.loads(proc.stdout)
    assert results and all(set(r) == {"name", "ok", "detail"} for r in results)
    obj = system_bus.conn.get_object(BUS_NAME, OBJECT_PATH)
    on_bus = [
        (str(n), bool(ok), str(d))
        for n, ok, d in obj.Check(dbus_interface=MANAGER_INTERFACE, timeout=10)
    ]
    assert [(r["name"], r["ok"], r["detail"]) for r in results] == on_bus
    # A host test bed has no sleep drop-in installed under --root, so a check fails: exit 1.
    failed = [r for r in results if not r["ok"]]
    assert failed, "expected at least one failing check on the host"
    assert proc.returncode == 1

    proc = ctl(system_bus, "check")
    assert proc.returncode == 1
    for r in results:
        mark = "ok  " if r["ok"] else "FAIL"
        assert any(ln.startswith(mark) and r["name"] in ln for ln in proc.stdout.splitlines())
    assert proc.stdout.rstrip().endswith(f"{len(failed)} of {len(results)} checks failed.")


def test_check_fails_without_devices(
    system_bus: SystemBus,
    logind: LogindMock,
    polkit: PolkitMock,
    start_daemon: DaemonFactory,
    tmp_path: Path,
) -> None:
    empty = FakeSystem(tmp_path / "empty")
    start_daemon(*empty.daemon_args())
    proc = ctl(system_bus, "check", "--json")
    assert proc.returncode == 1
    assert [r for r in json.loads(proc.stdout) if not r["ok"] and "LUKS" in r["detail"]]


def test_enable_disable(system_bus: SystemBus, daemon: Daemon, polkit: PolkitMock) -> None:
    # polkit denies by default: nothing changes, exit 1, the error name is shown.
    proc = ctl(system_bus, "disable")
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "cryptlockctl: SetEnabled failed: org.cryptlockd1.Error.NotAuthorized"
    )
    assert bool(bus_property(system_bus, "Enabled")) is True

    polkit.allow(POLKIT_ACTION_CONFIGURE)
    proc = ctl(system_bus, "disable")
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    assert not bus_property(system_bus, "Enabled")
    assert ctl_json(system_bus, "status")["Enabled"] is False
    assert ctl(system_bus, "enable").returncode == 0
    assert bus_property(system_bus, "Enabled")


def test_reload(
    system_bus: SystemBus, daemon: Daemon, polkit: PolkitMock, daemon_root: Path
) -> None:
    proc = ctl(system_bus, "reload")
    assert proc.returncode == 1 and "org.cryptlockd1.Error.NotAuthorized" in proc.stderr

    polkit.allow(POLKIT_ACTION_CONFIGURE)
    assert ctl(system_bus, "reload").returncode == 0
    dropins = daemon_root / "etc" / "cryptlockd" / "cryptlockd.conf.d"
    dropins.mkdir(parents=True)
    (dropins / "10-bad.conf").write_text("[prompt]\nretries = 3\n")
    proc = ctl(system_bus, "reload")
    assert proc.returncode == 1
    assert proc.stderr == (
        "cryptlockctl: Reload failed: org.cryptlockd1.Error.ConfigInvalid: "
        f"{dropins / '10-bad.conf'}: prompt.retries: unknown setting\n"
    )


def test_suspend(
    system_bus: SystemBus, daemon: Daemon, polkit: PolkitMock, logind: LogindMock
) -> None:
    proc = ctl(system_bus, "suspend")
    assert proc.returncode == 1
    assert "org.cryptlockd1.Error.NotAuthorized" in proc.stderr
    assert logind.method_calls("Suspend") == []

    # Allowed, but the host daemon is never Protected (no dm-crypt): refused, no sleep.
    polkit.allow(POLKIT_ACTION_SUSPEND)
    proc = ctl(system_bus, "suspend")
    assert proc.returncode == 1
    assert proc.stderr.startswith(
        "cryptlockctl: Suspend failed: "
        "org.cryptlockd1.Error.NotProtected: the next sleep would "
        "not wipe the keys: "
    )
    assert proc.stderr.count("\n") == 1
    assert logind.method_calls("Suspend") == []


class LineReader:
    """Lines from a child's stdout, collected by a thread; waits go through tests/wait."""

    TIMEOUT = 15.0

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.lines: list[str] = []
        self.ended = False
        self.taken = 0
        assert proc.stdout is not None
        stream = proc.stdout

        def pump() -> None:
            for line in stream:
                self.lines.append(line)
            self.ended = True

        threading.Thread(target=pump, daemon=True).start()

    def _take(self, predicate: Callable[[str], bool]) -> list[str] | None:
        """The lines up to and including the first that satisfies `predicate`, if any."""
        for i in range(self.taken, len(self.lines)):
            if predicate(self.lines[i]):
                seen, self.taken = self.lines[self.taken : i + 1], i + 1
                return seen
        if self.ended:
            raise GiveUp(f"output ended; seen: {self.lines[self.taken :]}")
        return None

    def until(self, predicate: Callable[[str], bool]) -> list[str]:
        return wait_until(lambda: self._take(predicate), self.TIMEOUT, message="monitor output")

    def next(self) -> str:
        [line] = self.until(lambda _line: True)
        return line

    def rest(self) -> list[str]:
        """What is left once the output has ended."""
        wait_until(lambda: self.ended, self.TIMEOUT, message="monitor output ended")
        seen, self.taken = self.lines[self.taken :], len(self.lines)
        return seen


def start_monitor(bus: SystemBus, *args: str) -> tuple[subprocess.Popen[str], LineReader]:
    proc = subprocess.Popen(
        [*CTL, "monitor", *args],
        env=bus.env(),
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    return proc, LineReader(proc)


def stop_monitor(proc: subprocess.Popen[str], sig: int = signal.SIGTERM) -> tuple[int, str]:
    proc.send_signal(sig)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError("monitor did not exit on a signal") from None
    assert proc.stderr is not None
    return proc.returncode, proc.stderr.read()


def forge_cycle_finished(bus: SystemBus, destination: str | None) -> None:
    """A CycleFinished from a connection that is not the daemon's."""
    import dbus.lowlevel

    msg = dbus.lowlevel.SignalMessage(OBJECT_PATH, MANAGER_INTERFACE, "CycleFinished")
    msg.append(True, dbus.Dictionary({}, signature="sv"), signature="ba{sv}")
    if destination is not None:
        msg.set_destination(destination)
    bus.conn.send_message(msg)


def test_monitor_json(system_bus: SystemBus, daemon: Daemon, polkit: PolkitMock) -> None:
    proc, reader = start_monitor(system_bus, "--json")
    try:
        first = json.loads(reader.next())
        assert first["event"] == "status"
        assert first["properties"]["Enabled"] is True
        assert [d["name"] for d in first["properties"]["Devices"]] == ["cryptdata", "cryptroot"]

        # Forged signals, broadcast and sent straight to the monitor, must not be printed.
        me = unique_name_of(system_bus, proc.pid)
        for dest in (None, me):
            forge_cycle_finished(system_bus, None)
            forge_cycle_finished(system_bus, dest)
        # A round trip on the same connection: the bus has passed the forgeries on.
        assert system_bus.name_has_owner(BUS_NAME)

        def enabled_is(value: bool) -> Callable[[str], bool]:
            return lambda line: json.loads(line).get("changed", {}).get("Enabled") is value

        polkit.allow(POLKIT_ACTION_CONFIGURE)
        assert ctl(system_bus, "disable").returncode == 0
        seen = reader.until(enabled_is(False))
        assert ctl(system_bus, "enable").returncode == 0
        seen += reader.until(enabled_is(True))
    finally:
        rc, err = stop_monitor(proc)
    assert (rc, err) == (0, "")
    seen += reader.rest()
    events = [json.loads(line) for line in seen]
    assert {e["event"] for e in events} == {"PropertiesChanged"}, events
    assert all(e["changed"] and isinstance(e["invalidated"], list) for e in events)


def test_monitor_human_and_daemon_leaving(
    system_bus: SystemBus, daemon: Daemon, polkit: PolkitMock
) -> None:
    proc, reader = start_monitor(system_bus)
    try:
        first = reader.next()
        assert " status: " in first and "Enabled=yes" in first and "State=idle" in first
        polkit.allow(POLKIT_ACTION_CONFIGURE)
        assert ctl(system_bus, "disable").returncode == 0
        reader.until(lambda line: " changed: " in line and "Enabled=no" in line)
        daemon.stop()
        reader.until(lambda line: line.endswith(" cryptlockd left the bus\n"))
    finally:
        rc, err = stop_monitor(proc, signal.SIGINT)
    assert (rc, err) == (0, "")


def test_monitor_without_daemon(system_bus: SystemBus) -> None:
    proc, reader = start_monitor(system_bus, "--json")
    assert reader.rest() == []
    proc.wait(15)
    assert proc.stderr is not None
    assert (proc.returncode, proc.stderr.read()) == (1, NOT_RUNNING)


def test_status_timeout_is_one_line(system_bus: SystemBus, daemon: Daemon) -> None:
    # A daemon that stopped answering (SIGSTOP) still owns its name: the call times out.
    os.kill(daemon.pid, signal.SIGSTOP)
    try:
        proc = ctl(system_bus, "status", "--timeout", "0.5")
    finally:
        os.kill(daemon.pid, signal.SIGCONT)
    assert proc.returncode == 1
    assert proc.stderr == "cryptlockctl: GetAll: no answer from cryptlockd within 0.5 s\n"
