"""Host integration fixtures: a private dbus-daemon, python-dbusmock logind and polkitd mocks
(separate processes, Debian's python3-dbusmock), and the REAL daemon as a subprocess.

Every fixture owns its processes and cleans them up, even when the test fails. The logs of
the daemon and the mocks are attached to the report of a failed test.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from dbus_fast.aio import MessageBus

from cryptlockd.defs import (
    BUS_NAME,
    LOGIND_BUS_NAME,
    LOGIND_MANAGER_INTERFACE,
    LOGIND_PATH,
    POLKIT_BUS_NAME,
    POLKIT_INTERFACE,
    POLKIT_PATH,
)
from tests.fakesys import FakeSystem, plain_luks2
from tests.wait import GiveUp, wait_until

REPO = Path(__file__).resolve().parents[2]
VENV_PYTHON = REPO / ".venv" / "bin" / "python"
# Debian's python3-dbusmock runs under the system interpreter, as a separate process.
MOCK_PYTHON = "/usr/bin/python3"
DBUS_DAEMON = shutil.which("dbus-daemon") or "/usr/bin/dbus-daemon"
MOCK_IFACE = "org.freedesktop.DBus.Mock"
START_TIMEOUT = 20.0

# A bus on which everybody may do everything: the daemon's behaviour, not the policy, is
# under test. The limits are raised because the defaults would refuse 200 pending calls.
# Both policies let everybody connect and receive; they differ in who may own and send.
_EVERYONE_RECEIVES = """
    <allow user="*"/>
    <allow receive_type="method_call"/>
    <allow receive_type="method_return"/>
    <allow receive_type="error"/>
    <allow receive_type="signal"/>"""

PERMISSIVE_POLICY = f"""
  <policy context="default">{_EVERYONE_RECEIVES}
    <allow own="*"/>
    <allow send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_type="method_return"/>
    <allow send_type="error"/>
  </policy>
"""

# What Debian's /usr/share/dbus-1/system.conf says, so that our policy file is tested
# against the same defaults it meets on a real machine. Root owns the mocks' names.
SYSTEM_LIKE_POLICY = f"""
  <policy context="default">{_EVERYONE_RECEIVES}
    <deny own="*"/>
    <deny send_type="method_call"/>
    <allow send_type="signal"/>
    <allow send_requested_reply="true" send_type="method_return"/>
    <allow send_requested_reply="true" send_type="error"/>
    <allow send_destination="org.freedesktop.DBus" send_interface="org.freedesktop.DBus"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Introspectable"/>
    <allow send_destination="org.freedesktop.DBus"
           send_interface="org.freedesktop.DBus.Properties"/>
  </policy>
  <policy user="root">
    <allow own="org.freedesktop.login1"/>
    <allow own="org.freedesktop.PolicyKit1"/>
    <allow send_destination="org.freedesktop.login1"/>
    <allow send_destination="org.freedesktop.PolicyKit1"/>
  </policy>
"""


def _bus_config(socket: Path, policy: str, include: Path | None) -> str:
    inc = f"  <include>{include}</include>\n" if include else ""
    return f"""<!DOCTYPE busconfig PUBLIC "-//freedesktop//DTD D-Bus Bus Configuration 1.0//EN"
 "http://www.freedesktop.org/standards/dbus/1.0/busconfig.dtd">
<busconfig>
  <type>system</type>
  <listen>unix:path={socket}</listen>
  <auth>EXTERNAL</auth>
{policy}
{inc}
  <limit name="max_replies_per_connection">50000</limit>
  <limit name="max_connections_per_user">1000</limit>
  <limit name="max_incoming_bytes">1000000000</limit>
  <limit name="max_outgoing_bytes">1000000000</limit>
  <limit name="max_message_size">100000000</limit>
</busconfig>
"""


def _stop(proc: subprocess.Popen[Any], timeout: float = 10.0) -> int | None:
    """SIGTERM, then SIGKILL after `timeout`; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)
    return proc.returncode


class LoggedProcess:
    """A child process whose stdout+stderr go to a file, shown when a test fails."""

    def __init__(
        self, name: str, argv: list[str], env: dict[str, str], logfile: Path, **popen: Any
    ) -> None:
        self.name = name
        self.argv = argv
        self.logfile = logfile
        self._out = open(logfile, "ab")  # noqa: SIM115 - closed in stop()
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            argv,
            env=env,
            stdout=self._out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            **popen,
        )
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def alive(self) -> bool:
        return self.proc.poll() is None

    def log(self) -> str:
        try:
            return self.logfile.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def stop(self, timeout: float = 10.0) -> int | None:
        self.returncode = _stop(self.proc, timeout)
        self._out.close()
        return self.returncode


class Reporter:
    """Collects the processes of one test so a failed test's report can show their logs."""

    def __init__(self) -> None:
        self.processes: list[LoggedProcess] = []


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    rep = outcome.get_result()
    reporter: Reporter | None = getattr(item, "_cryptlockd_reporter", None)
    if reporter is not None and rep.failed:
        for p in reporter.processes:
            rep.sections.append((f"log of {p.name} (pid {p.pid})", p.log() or "(empty)"))


@pytest.fixture
def _reporter(request: pytest.FixtureRequest) -> Reporter:
    reporter = Reporter()
    request.node._cryptlockd_reporter = reporter
    return reporter


@pytest.fixture
def runtime_dir() -> Iterator[Path]:
    """A world-traversable temp dir (the policy tests connect as an unprivileged uid)."""
    d = Path(tempfile.mkdtemp(prefix="cryptlockd-it-"))
    d.chmod(0o755)
    yield d
    shutil.rmtree(d, ignore_errors=True)


class SystemBus:
    def __init__(self, address: str, directory: Path, proc: LoggedProcess) -> None:
        self.address = address
        self.directory = directory
        self.proc = proc
        self._conn: Any = None

    @property
    def conn(self) -> Any:
        """A dbus-python connection for the synchronous fixture side (mock controls)."""
        if self._conn is None:
            import dbus.bus

            self._conn = dbus.bus.BusConnection(self.address)
        return self._conn

    def name_has_owner(self, name: str) -> bool:
        return bool(self.conn.name_has_owner(name))

    def get_name_owner(self, name: str) -> str:
        return str(self.conn.get_name_owner(name))

    def env(self, extra: dict[str, str] | None = None) -> dict[str, str]:
        env = {
            k: v
            for k, v in os.environ.items()
            if k not in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM")
        }
        env["DBUS_SYSTEM_BUS_ADDRESS"] = self.address
        env.pop("DBUS_SESSION_BUS_ADDRESS", None)
        env["PYTHONUNBUFFERED"] = "1"
        if extra:
            env.update(extra)
        return env

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        self.proc.stop()


def start_bus(
    directory: Path,
    reporter: Reporter,
    *,
    policy: str = PERMISSIVE_POLICY,
    include: Path | None = None,
) -> SystemBus:
    socket = directory / "system_bus_socket"
    config = directory / "bus.conf"
    config.write_text(_bus_config(socket, policy, include))
    proc = LoggedProcess(
        "dbus-daemon",
        [DBUS_DAEMON, f"--config-file={config}", "--nofork", "--nopidfile"],
        dict(os.environ),
        directory / "dbus-daemon.log",
    )
    reporter.processes.append(proc)
    address = f"unix:path={socket}"
    bus = SystemBus(address, directory, proc)

    def up() -> bool:
        if not proc.alive():
            raise GiveUp(f"dbus-daemon exited: {proc.log()}")
        return socket.exists() and bus.conn is not None

    try:
        wait_until(up, START_TIMEOUT, message="private dbus-daemon listening")
    except BaseException:
        bus.close()
        raise
    return bus


POLICY_FILE = REPO / "dbus" / "org.cryptlockd1.conf"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "system_bus_policy: the private bus enforces a system-bus-like default "
        "deny policy and loads dbus/org.cryptlockd1.conf",
    )


@pytest.fixture
def system_bus(
    runtime_dir: Path, _reporter: Reporter, request: pytest.FixtureRequest
) -> Iterator[SystemBus]:
    if request.node.get_closest_marker("system_bus_policy"):
        bus = start_bus(runtime_dir, _reporter, policy=SYSTEM_LIKE_POLICY, include=POLICY_FILE)
    else:
        bus = start_bus(runtime_dir, _reporter)
    yield bus
    bus.close()


class DBusMock:
    """A python-dbusmock template in its own process on the private bus. A subclass names
    the template and the object it serves."""

    template: str
    bus_name: str
    path: str
    interface: str

    def __init__(self, bus: SystemBus, reporter: Reporter) -> None:
        self.bus = bus
        self.reporter = reporter
        self.proc: LoggedProcess | None = None
        self.start()

    def start(self) -> None:
        self.proc = LoggedProcess(
            f"{self.template} mock",
            [MOCK_PYTHON, "-m", "dbusmock", "--system", "--template", self.template],
            self.bus.env(),
            self.bus.directory / f"{self.template}-mock.log",
        )
        self.reporter.processes.append(self.proc)
        proc = self.proc

        def up() -> bool:
            if not proc.alive():
                raise GiveUp(f"{self.template} mock exited: {proc.log()}")
            return self.bus.name_has_owner(self.bus_name)

        wait_until(up, START_TIMEOUT, message=f"{self.bus_name} on the bus")
        self.after_start()

    def after_start(self) -> None:
        pass

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.stop()
            self.proc = None

    def restart(self) -> None:
        """A crash and restart: the bus name gets a new unique owner."""
        old = self.bus.get_name_owner(self.bus_name)
        self.stop()
        wait_until(
            lambda: not self.bus.name_has_owner(self.bus_name),
            START_TIMEOUT,
            message=f"{self.bus_name} released",
        )
        self.start()
        assert self.bus.get_name_owner(self.bus_name) != old

    @property
    def obj(self) -> Any:
        return self.bus.conn.get_object(self.bus_name, self.path)

    def call(self, method: str, *args: Any, interface: str | None = None) -> Any:
        return getattr(self.obj, method)(
            *args, dbus_interface=interface or self.interface, timeout=10
        )

    def mock(self, method: str, *args: Any) -> Any:
        return self.call(method, *args, interface=MOCK_IFACE)

    def method_calls(self, method: str) -> list[Any]:
        """Calls the mock has received, as (timestamp, args)."""
        return list(self.mock("GetMethodCalls", method))


class LogindMock(DBusMock):
    template = "logind"
    bus_name = LOGIND_BUS_NAME
    path = LOGIND_PATH
    interface = LOGIND_MANAGER_INTERFACE

    def after_start(self) -> None:
        import dbus

        # The template lacks it; the daemon reads it for the delay budget.
        self.mock(
            "AddProperty", LOGIND_MANAGER_INTERFACE, "InhibitDelayMaxUSec", dbus.UInt64(5_000_000)
        )

    def list_inhibitors(self) -> list[tuple[str, str, str, str, int, int]]:
        return [tuple(x) for x in self.call("ListInhibitors")]  # type: ignore[misc]

    def our_inhibitors(self) -> list[tuple[str, str, str, str, int, int]]:
        return [i for i in self.list_inhibitors() if str(i[1]) == "cryptlockd"]

    def prepare_for_sleep(self, start: bool) -> None:
        """The genuine signal, sent by the owner of org.freedesktop.login1."""
        import dbus

        self.mock(
            "EmitSignal", LOGIND_MANAGER_INTERFACE, "PrepareForSleep", "b", [dbus.Boolean(start)]
        )


class PolkitMock(DBusMock):
    """polkitd: denies everything until told otherwise."""

    template = "polkitd"
    bus_name = POLKIT_BUS_NAME
    path = POLKIT_PATH
    interface = POLKIT_INTERFACE

    def allow(self, *actions: str) -> None:
        self.mock("SetAllowed", list(actions))

    def allow_unknown(self, allow: bool) -> None:
        self.mock("AllowUnknown", allow)

    def hang(self, hang: bool) -> None:
        self.mock("SimulateHang", hang)

    def have_hanging_calls(self) -> bool:
        return bool(self.mock("HaveHangingCalls"))

    def release_hanging_calls(self) -> None:
        self.mock("ReleaseHangingCalls")


@pytest.fixture
def logind(system_bus: SystemBus, _reporter: Reporter) -> Iterator[LogindMock]:
    mock = LogindMock(system_bus, _reporter)
    yield mock
    mock.stop()


@pytest.fixture
def polkit(system_bus: SystemBus, _reporter: Reporter) -> Iterator[PolkitMock]:
    mock = PolkitMock(system_bus, _reporter)
    yield mock
    mock.stop()


class Daemon(LoggedProcess):
    def exit_status(self) -> int | None:
        return self.proc.poll()


DaemonFactory = Callable[..., Daemon]


def make_daemon_root(directory: Path) -> Path:
    """An empty --root (no config file: defaults apply)."""
    root = directory / "root"
    (root / "etc" / "cryptlockd").mkdir(parents=True)
    return root


def make_luks_system(directory: Path, daemon_root: Path) -> FakeSystem:
    """A fake machine on which every check but the real helper passes: one LUKS2 root
    device, cgroup v2, sync_on_suspend, suspend-to-RAM, and our sleep drop-in under
    --root. Pass `*fs.daemon_args()` to the daemon."""
    fs = FakeSystem(directory / "fake")
    plain_luks2(fs)
    power = fs.sysfs / "power"
    power.mkdir(parents=True)
    (power / "state").write_text("freeze mem disk\n")
    (power / "sync_on_suspend").write_text("1\n")
    cgroup = fs.sysfs / "fs" / "cgroup"
    cgroup.mkdir(parents=True)
    (cgroup / "cgroup.controllers").write_text("cpu io memory pids\n")
    dropin = daemon_root / "etc/systemd/system/systemd-suspend.service.d/cryptlockd.conf"
    dropin.parent.mkdir(parents=True)
    dropin.write_text("[Service]\n")
    return fs


def launch_daemon(
    bus: SystemBus,
    reporter: Reporter,
    root: Path,
    logfile: Path,
    *args: str,
    env: dict[str, str] | None = None,
    wait: bool = True,
    udev: bool = False,
    **popen: Any,
) -> Daemon:
    """The daemon (recording_daemon.py) on the private bus. Defaults: --root <root> --no-udev
    --log-target stderr, unless `args` pass those options. With
    wait=True it returns once the daemon owns org.cryptlockd1."""
    argv = [str(VENV_PYTHON), "-m", "tests.integration.recording_daemon", *args]
    defaults = {"--root": str(root), "--log-target": "stderr"}
    for opt, value in defaults.items():
        if opt not in args:
            argv += [opt, value]
    if not udev and "--no-udev" not in args:
        argv.append("--no-udev")
    d = Daemon(logfile.stem, argv, bus.env(env), logfile, cwd=str(REPO), **popen)
    reporter.processes.append(d)
    if wait:

        def up() -> bool:
            if not d.alive():
                raise GiveUp(f"daemon exited with {d.exit_status()}:\n{d.log()}")
            return bus.name_has_owner(BUS_NAME)

        try:
            wait_until(up, START_TIMEOUT, message="daemon owns org.cryptlockd1")
        except BaseException:
            d.stop()
            raise
    return d


@pytest.fixture
def daemon_root(tmp_path: Path) -> Path:
    return make_daemon_root(tmp_path)


@pytest.fixture
def luks_system(tmp_path: Path, daemon_root: Path) -> FakeSystem:
    return make_luks_system(tmp_path, daemon_root)


@pytest.fixture
def start_daemon(
    system_bus: SystemBus, _reporter: Reporter, daemon_root: Path, tmp_path: Path
) -> Iterator[DaemonFactory]:
    """start_daemon(*args, env=None, wait=True, udev=False): launch_daemon() on this test's
    bus and --root; every daemon it started is stopped at the end."""
    daemons: list[Daemon] = []

    def factory(*args: str, **options: Any) -> Daemon:
        logfile = tmp_path / f"cryptlockd-{len(daemons) + 1}.log"
        d = launch_daemon(system_bus, _reporter, daemon_root, logfile, *args, **options)
        daemons.append(d)
        return d

    yield factory
    for d in daemons:
        d.stop()


@pytest_asyncio.fixture
async def client(system_bus: SystemBus) -> AsyncIterator[MessageBus]:
    bus = await MessageBus(bus_address=system_bus.address, negotiate_unix_fd=True).connect()
    yield bus
    bus.disconnect()
    try:
        await bus.wait_for_disconnect()
    except Exception as e:  # a dropped connection is what we asked for
        print(f"client disconnect: {e!r}", file=sys.stderr)
