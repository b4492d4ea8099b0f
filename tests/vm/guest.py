"""Drives one QEMU test guest: boot, commands through the agent, QMP events, keys, screens, RAM.

Everything here has a deadline. A guest that stops answering is reported as hung, with the
QEMU run state and the console's last lines, never waited on forever and never passed.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import json
import logging
import os
import shlex
import shutil
import subprocess
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from qemu.qmp import QMPClient

from tests.vm import layout, machine
from tests.vm.image import TestbedImage
from tests.wait import GiveUp, wait_until_async

log = logging.getLogger(__name__)

# A quiet 2-core host boots the guest under TCG in about 50 s; with other TCG guests and
# builds on the same cores it has taken 160 s, hence the margin.
BOOT_TIMEOUT = {"kvm": 90.0, "tcg": 420.0}
SOCKETS_PREFIX = "cryptlockd-vm-"  # + the test run's pid: <tmp>/cryptlockd-vm-<pid>-*/


T = TypeVar("T")


class GuestError(AssertionError):
    """Something in the guest did not happen as required (an AssertionError, so pytest shows
    the message as the failure)."""


class GuestLost(GuestError, GiveUp):
    """Waiting longer cannot help: QEMU exited, or a migration failed. A GiveUp, so a
    `wait_until_async` that meets it fails at once instead of trying until its deadline."""


class GuestHung(GuestLost):
    """The guest (or QEMU) gave no answer within a deadline."""


class CommandFailed(GuestError):
    pass


@dataclass(frozen=True)
class CommandResult:
    command: str
    rc: int
    stdout_bytes: bytes
    stderr_bytes: bytes
    seconds: float

    @property
    def stdout(self) -> str:
        return self.stdout_bytes.decode(errors="replace")

    @property
    def stderr(self) -> str:
        return self.stderr_bytes.decode(errors="replace")

    def json(self) -> Any:
        return json.loads(self.stdout_bytes)


@dataclass(frozen=True)
class DiskSet:
    """The guest's two disks: vda (root LUKS) and vdb (data LUKS), as image files."""

    root: Path
    data: Path
    fmt: str = "qcow2"

    @classmethod
    def of_image(cls, image: TestbedImage) -> DiskSet:
        return cls(image.root_disk, image.data_disk, "raw")

    def overlay(self, directory: Path) -> DiskSet:
        """Copy-on-write overlays on these disks, so a test never changes its backing files."""
        directory.mkdir(parents=True, exist_ok=True)
        out = []
        for base, name in ((self.root, "root.qcow2"), (self.data, "data.qcow2")):
            target = directory / name
            subprocess.run(
                [
                    "qemu-img",
                    "create",
                    "-q",
                    "-f",
                    "qcow2",
                    "-F",
                    self.fmt,
                    "-b",
                    str(base.resolve()),
                    str(target),
                ],
                check=True,
                capture_output=True,
                timeout=60,
            )
            out.append(target)
        return DiskSet(out[0], out[1], "qcow2")


@dataclass
class Event:
    name: str
    data: dict[str, Any]
    monotonic: float


# send-key names (QEMU qcodes) for characters; shifted characters on a US layout.
_PLAIN = {
    " ": "spc",
    "-": "minus",
    "=": "equal",
    "[": "bracket_left",
    "]": "bracket_right",
    ";": "semicolon",
    "'": "apostrophe",
    "`": "grave_accent",
    "\\": "backslash",
    ",": "comma",
    ".": "dot",
    "/": "slash",
    "\n": "ret",
    "\t": "tab",
}
_SHIFTED = {
    "!": "1",
    "@": "2",
    "#": "3",
    "$": "4",
    "%": "5",
    "^": "6",
    "&": "7",
    "*": "8",
    "(": "9",
    ")": "0",
    "_": "minus",
    "+": "equal",
    "{": "bracket_left",
    "}": "bracket_right",
    ":": "semicolon",
    '"': "apostrophe",
    "~": "grave_accent",
    "|": "backslash",
    "<": "comma",
    ">": "dot",
    "?": "slash",
}


def keys_for(char: str) -> list[str]:
    """The qcodes that type `char` (shift first where needed)."""
    if char.isascii() and (char.islower() or char.isdigit()):
        return [char]
    if char.isascii() and char.isupper():
        return ["shift", char.lower()]
    if char in _PLAIN:
        return [_PLAIN[char]]
    if char in _SHIFTED:
        return ["shift", _SHIFTED[char]]
    raise ValueError(f"no key mapping for {char!r}")


@dataclass
class Guest:
    """One booted guest. Create with `Guest(image, disks, workdir, accel)`, then `await start()`.

    workdir receives console.log, qemu.log and anything the test saves (screens, RAM dumps).
    """

    image: TestbedImage
    disks: DiskSet
    workdir: Path
    accel: str
    extra_drives: Sequence[Path] = ()
    name: str = "guest"
    # A RAM/device state saved by save_state() from a guest on the backing disks of these
    # disks: start() resumes it instead of booting (seconds instead of a minute under TCG).
    incoming: Path | None = None
    # More QEMU arguments, for a test's own device (tests/vm/swtpm.py's TPM): such a guest
    # boots, since a saved state holds only the devices it was saved with.
    extra_args: Sequence[str] = ()
    events: list[Event] = field(default_factory=list)
    boot_seconds: float | None = None

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.console_log = self.workdir / "console.log"
        self.qemu_log = self.workdir / "qemu.log"
        # The sockets live in a short private directory, not in workdir: a Unix socket path
        # has 107 bytes at most, and workdir is <checkout>/tests/vm/artifacts/<suite>/<test>.
        self._sockets = Path(tempfile.mkdtemp(prefix=f"{SOCKETS_PREFIX}{os.getpid()}-"))
        self._qmp_sock = self._sockets / "qmp.sock"
        self._agent_sock = self._sockets / "agent.sock"
        self._proc: asyncio.subprocess.Process | None = None
        self._qmp: QMPClient | None = None
        self._agent_reader: asyncio.StreamReader | None = None
        self._agent_writer: asyncio.StreamWriter | None = None
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._ids = itertools.count(1)
        self._tasks: list[asyncio.Task[None]] = []
        self._event_added = asyncio.Event()
        self._started = 0.0

    # ---- life cycle -------------------------------------------------------------------

    def qemu_argv(self) -> list[str]:
        drives = []
        for path, fmt in ((self.disks.root, self.disks.fmt), (self.disks.data, self.disks.fmt)):
            drives += ["-drive", f"file={path},format={fmt},if=virtio,cache=unsafe"]
        for extra in self.extra_drives:
            drives += ["-drive", f"file={extra},format=raw,if=virtio,readonly=on"]
        return [
            *machine.base_args(self.accel),
            "-S",
            "-name",
            self.name,
            "-kernel",
            str(self.image.kernel),
            "-initrd",
            str(self.image.initrd),
            "-append",
            " ".join([self.image.cmdline, *machine.kernel_args(self.accel)]),
            "-chardev",
            f"file,id=serial0,path={self.console_log}",
            "-serial",
            "chardev:serial0",
            "-chardev",
            f"socket,id=qmp,path={self._qmp_sock},server=on,wait=off",
            "-mon",
            "chardev=qmp,mode=control",
            "-chardev",
            f"socket,id=agent,path={self._agent_sock},server=on,wait=off",
            "-device",
            "virtio-serial-pci",
            "-device",
            f"virtserialport,chardev=agent,name={layout.AGENT_PORT}",
            *drives,
            *self.extra_args,
            *(
                ["-incoming", f"exec:cat {shlex.quote(str(self.incoming))}"]
                if self.incoming
                else []
            ),
        ]

    async def start(self, *, wait_agent: bool = True, timeout: float | None = None) -> None:
        """Launch QEMU paused, connect QMP and the agent socket, run, and (by default) wait
        until the agent answers: the guest has booted to sysinit with root on LUKS."""
        argv = self.qemu_argv()
        (self.workdir / "qemu.cmdline").write_text(shlex.join(argv) + "\n")
        with self.qemu_log.open("wb") as qlog:
            self._proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=subprocess.DEVNULL,
                stdout=qlog,
                stderr=subprocess.STDOUT,
            )
        await self._wait_for_socket(self._qmp_sock)
        self._qmp = QMPClient(self.name)
        await asyncio.wait_for(self._qmp.connect(str(self._qmp_sock)), 10)
        self._tasks.append(asyncio.create_task(self._record_events()))
        await self._wait_for_socket(self._agent_sock)
        self._agent_reader, self._agent_writer = await asyncio.open_unix_connection(
            str(self._agent_sock),
            limit=64 * 1024 * 1024,
        )
        self._tasks.append(asyncio.create_task(self._read_agent()))
        self._started = time.monotonic()
        if self.incoming is not None:
            await self._wait_incoming()
        await self.qmp("cont")
        if wait_agent:
            await self.wait_agent(timeout or BOOT_TIMEOUT[self.accel], what="boot")
            self.boot_seconds = time.monotonic() - self._started
            log.info("%s booted in %.1f s (%s)", self.name, self.boot_seconds, self.accel)

    async def _wait_incoming(self, timeout: float = 120.0) -> None:
        async def loaded() -> str | None:
            state = str((await self.qmp("query-status"))["status"])
            return None if state == "inmigrate" else state

        state = await self.until(
            loaded, timeout, f"loading {self.incoming}", interval=0.2, hung=True
        )
        migration = await self.qmp("query-migrate")
        if state != "paused" or migration.get("status") not in (None, "completed"):
            raise GuestError(
                f"{self.name}: restoring {self.incoming} failed: state {state}, "
                f"migration {migration}{self._qemu_output()}"
            )

    async def save_state(self, path: Path, timeout: float = 300.0) -> None:
        """Stops the guest, writes its RAM and device state to `path` and quits QEMU. Its disks
        must stay as they are now: guests started with incoming=path run on overlays of them."""
        await self.qmp("stop")
        tmp = path.with_name(path.name + ".tmp")
        await self.qmp("migrate", {"uri": f"exec:cat > {shlex.quote(str(tmp))}"})

        async def saved() -> bool:
            info = await self.qmp("query-migrate")
            if info.get("status") in ("failed", "cancelled"):
                raise GuestLost(f"{self.name}: saving the state failed: {info}")
            return bool(info.get("status") == "completed")

        await self.until(saved, timeout, f"saving the state to {path}", interval=0.2)
        tmp.replace(path)
        with contextlib.suppress(Exception):  # QEMU may drop the connection before replying
            await self.qmp("quit", timeout=10)
        assert self._proc is not None
        await asyncio.wait_for(self._proc.wait(), 60)
        await self.close()

    async def _wait_for_socket(self, path: Path) -> None:
        async def created() -> bool:
            return path.exists()

        await self.until(created, 10, f"QEMU creates {path.name}", interval=0.05)

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    def _raise_if_exited(self) -> None:
        if self._proc is not None and self._proc.returncode is not None:
            raise GuestLost(
                f"QEMU exited with status {self._proc.returncode}{self._qemu_output()}\n"
                f"console tail:\n{self.console_tail()}"
            )

    def _qemu_output(self) -> str:
        """QEMU's own output (usually empty), as a block to append to a report."""
        text = self.qemu_log.read_text(errors="replace")[-2000:] if self.qemu_log.exists() else ""
        return f"\nqemu.log:\n{text}" if text.strip() else ""

    async def poweroff(self, timeout: float = 120.0) -> None:
        """Clean shutdown through systemd; waits for QEMU to exit."""
        assert self._proc is not None
        with contextlib.suppress(GuestError, OSError):
            await self._send(
                {"op": "run", "argv": ["systemctl", "--no-block", "poweroff"], "timeout": 10}
            )
        try:
            await asyncio.wait_for(self._proc.wait(), timeout)
        except TimeoutError as e:
            raise GuestHung(
                f"{self.name}: no power-off within {timeout:.0f} s\n"
                f"console tail:\n{self.console_tail()}"
            ) from e
        await self.close()

    async def close(self) -> None:
        """Kill QEMU if it still runs and drop the connections. Safe to call twice."""
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._tasks.clear()
        if self._agent_writer is not None:
            self._agent_writer.close()
            self._agent_writer = None
        if self._qmp is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._qmp.disconnect(), 5)
            self._qmp = None
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()
            await self._proc.wait()
        for fut in self._pending.values():
            fut.cancel()  # nobody waits for them any more (abandoned pings, a dead guest)
        self._pending.clear()
        shutil.rmtree(self._sockets, ignore_errors=True)

    # ---- waiting ------------------------------------------------------------------------

    async def until(
        self,
        predicate: Callable[[], Awaitable[T]],
        timeout: float,
        what: str,
        *,
        interval: float = 0.5,
        hung: bool = False,
    ) -> T:
        """`wait_until_async` for this guest: polls the coroutine `predicate` until it
        returns something truthy, and returns that. Gives up at once when QEMU exits or the
        guest stops answering (GuestLost, GuestHung). At the deadline it raises GuestError, or
        GuestHung when `hung` says that the guest not answering is what timed out, with the
        last "not yet" reason, QEMU's run state and the console's tail."""
        last: list[Exception] = []

        async def attempt() -> T:
            self._raise_if_exited()
            try:
                return await predicate()
            except GiveUp:
                raise
            except Exception as e:
                last[:] = [e]
                raise

        try:
            return await wait_until_async(attempt, timeout, interval, f"{self.name}: {what}")
        except GiveUp:
            raise
        except AssertionError:
            reason = f"; last: {last[0]}" if last else ""
            error = GuestHung if hung else GuestError
            raise error(
                f"{self.name}: {what}: not true within {timeout:.0f} s{reason}\n"
                f"(QEMU state: {await self.status()}){self._qemu_output()}\n"
                f"console tail:\n{self.console_tail()}"
            ) from None

    # ---- QMP ----------------------------------------------------------------------------

    async def qmp(self, cmd: str, args: dict[str, Any] | None = None, timeout: float = 30.0) -> Any:
        self._raise_if_exited()
        assert self._qmp is not None
        try:
            return await asyncio.wait_for(self._qmp.execute(cmd, args), timeout)
        except TimeoutError as e:
            raise GuestHung(f"QMP {cmd} did not answer within {timeout:.0f} s") from e

    async def status(self) -> str:
        """QEMU's run state: running, suspended, paused, shutdown..."""
        try:
            return str((await self.qmp("query-status", timeout=5))["status"])
        except Exception as e:
            return f"unknown ({e})"

    async def _record_events(self) -> None:
        assert self._qmp is not None
        async for message in self._qmp.events:
            data = message.get("data")
            self.events.append(
                Event(
                    str(message["event"]), data if isinstance(data, dict) else {}, time.monotonic()
                )
            )
            log.debug("%s: QMP event %s", self.name, message["event"])
            self._event_added.set()

    def event_mark(self) -> int:
        """Pass to wait_event(since=) to ignore events from before this call."""
        return len(self.events)

    async def wait_event(self, name: str, timeout: float, since: int = 0) -> Event:
        """Waits for QMP event `name` recorded after `since` (event_mark()). Not a poll: it
        sleeps until the event reader adds an event, with the deadline as the limit."""
        deadline = time.monotonic() + timeout
        while True:
            for event in self.events[since:]:
                if event.name == name:
                    return event
            self._raise_if_exited()
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise GuestError(
                    f"{self.name}: no QMP {name} event within {timeout:.0f} s "
                    f"(QEMU state: {await self.status()}; events since mark: "
                    f"{[e.name for e in self.events[since:]]})\n"
                    f"console tail:\n{self.console_tail()}"
                )
            self._event_added.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._event_added.wait(), min(remaining, 1.0))

    async def wakeup(self) -> None:
        await self.qmp("system_wakeup")

    async def send_keys(self, *qcodes: str, hold_ms: int = 40) -> None:
        keys = [{"type": "qcode", "data": k} for k in qcodes]
        await self.qmp("send-key", {"keys": keys, "hold-time": hold_ms})

    async def type_text(self, text: str, *, enter: bool = True) -> None:
        """Types `text` on the guest's keyboard, one send-key per character (shift for
        capitals and symbols, US layout)."""
        for char in text:
            await self.send_keys(*keys_for(char))
        if enter:
            await self.send_keys("ret")

    async def screendump(self, name: str) -> Path:
        """Saves the VT (bochs-drm framebuffer) as workdir/<name>.png."""
        path = self.workdir / f"{name}.png"
        await self.qmp("screendump", {"filename": str(path), "format": "png"})
        return path

    async def dump_memory(self, name: str = "memory", timeout: float = 300.0) -> Path:
        """Writes the guest's RAM (ELF core, no paging) to workdir/<name>.elf. Works while the
        guest is suspended. Delete the file when done: it is as large as the guest's RAM."""
        path = self.workdir / f"{name}.elf"
        await self.qmp(
            "dump-guest-memory", {"paging": False, "protocol": f"file:{path}"}, timeout=timeout
        )
        return path

    # ---- agent --------------------------------------------------------------------------

    async def _read_agent(self) -> None:
        assert self._agent_reader is not None
        while True:
            line = await self._agent_reader.readline()
            if not line:
                return
            try:
                reply = json.loads(line)
            except ValueError:
                continue
            fut = self._pending.pop(reply.get("id"), None)
            if fut is not None and not fut.done():
                fut.set_result(reply)

    async def _send(self, request: dict[str, Any]) -> asyncio.Future[dict[str, Any]]:
        self._raise_if_exited()
        if self._agent_writer is None:
            raise GuestError("agent socket not connected")
        rid = next(self._ids)
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        self._agent_writer.write((json.dumps({**request, "id": rid}) + "\n").encode())
        await self._agent_writer.drain()
        return fut

    async def _request(self, request: dict[str, Any], timeout: float, what: str) -> dict[str, Any]:
        fut = await self._send(request)
        try:
            reply = await asyncio.wait_for(asyncio.shield(fut), timeout)
        except TimeoutError as e:
            raise GuestHung(
                f"{self.name}: the guest agent gave no answer within {timeout:.0f} s to {what} "
                f"(QEMU state: {await self.status()}). The guest looks hung.\n"
                f"console tail:\n{self.console_tail()}"
            ) from e
        if "error" in reply:
            raise GuestError(f"agent error for {what}: {reply['error']}")
        return reply

    async def wait_agent(self, timeout: float, what: str = "agent") -> None:
        """Pings until the agent answers. The agent's port may not be open yet when a ping is
        sent (the host side drops it), so ping repeatedly within the deadline."""

        async def pong() -> bool:
            fut = await self._send({"op": "ping"})
            try:
                await asyncio.wait_for(asyncio.shield(fut), 2.0)
            except TimeoutError:
                return False
            return True

        await self.until(pong, timeout, f"{what}: the guest agent answers", interval=0.1, hung=True)

    async def run(
        self,
        command: str | Sequence[str],
        *,
        timeout: float = 60.0,
        check: bool = True,
        input: bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> CommandResult:
        """Runs a command in the guest (a string goes through `sh -c`). The guest kills it
        after `timeout`; the host gives up 10 s later and reports the guest as hung."""
        argv = ["sh", "-c", command] if isinstance(command, str) else list(command)
        text = command if isinstance(command, str) else shlex.join(argv)
        request: dict[str, Any] = {"op": "run", "argv": argv, "timeout": timeout}
        if input is not None:
            request["stdin"] = base64.b64encode(input).decode()
        if env:
            request["env"] = env
        start = time.monotonic()
        reply = await self._request(request, timeout + 10, repr(text))
        result = CommandResult(
            text,
            int(reply["rc"]),
            base64.b64decode(reply["stdout"]),
            base64.b64decode(reply["stderr"]),
            time.monotonic() - start,
        )
        if check and result.rc != 0:
            raise CommandFailed(
                f"in the guest: {text!r} exited with status {result.rc}"
                f"{' (timed out)' if result.rc == -1000 else ''}\n"
                f"stdout: {result.stdout[-3000:]}\nstderr: {result.stderr[-3000:]}"
            )
        return result

    async def wait_for_command(
        self,
        command: str,
        timeout: float,
        what: str = "",
        *,
        ok: Callable[[str], object] | None = None,
        interval: float = 0.5,
    ) -> CommandResult:
        """Runs `command` until it exits 0 and `ok(stdout)` (if given) holds; returns that
        run. An exception from `ok` counts as "not yet"."""

        async def done() -> CommandResult:
            result = await self.run(command, check=False, timeout=min(timeout, 30.0))
            if result.rc != 0 or (ok is not None and not ok(result.stdout)):
                output = (result.stdout + result.stderr)[-1000:]
                raise GuestError(f"exit {result.rc}, output: {output}")
            return result

        return await self.until(done, timeout, what or repr(command), interval=interval)

    async def write_file(self, path: str, data: bytes, mode: int = 0o644) -> None:
        await self.run(["sh", "-c", f'cat > "$0" && chmod {mode:o} "$0"', path], input=data)

    async def spawn(self, command: str, log_path: str) -> int:
        """Starts `command` in the background in the guest (its own session, output to
        log_path) and returns its pid at once."""
        result = await self.run(
            ["sh", "-c", f'setsid sh -c "$0" > "{log_path}" 2>&1 < /dev/null & echo $!', command]
        )
        return int(result.stdout.strip())

    async def journal(self, timeout: float = 20.0) -> str:
        result = await self.run(
            "journalctl -b --no-pager -o short-monotonic", timeout=timeout, check=False
        )
        return result.stdout

    # ---- console ------------------------------------------------------------------------

    def console_text(self) -> str:
        return self.console_log.read_text(errors="replace") if self.console_log.exists() else ""

    def console_tail(self, lines: int = 25) -> str:
        return "\n".join(self.console_text().splitlines()[-lines:]) or "(empty)"

    def console_count(self, text: str) -> int:
        """How often `text` is on the console so far: pass it to wait_console(after=)."""
        return self.console_text().count(text)

    async def wait_console(self, text: str, timeout: float, *, after: int = 0) -> None:
        """Waits until `text` has appeared on the console more than `after` times."""

        async def shown() -> bool:
            return self.console_count(text) > after

        await self.until(
            shown, timeout, f"{text!r} on the console (seen {after} times before)", interval=0.2
        )


def artifacts_dir(suite: str) -> Path:
    """Where the guests of one release keep their files: <base>/<suite>, base being
    CRYPTLOCKD_VM_ARTIFACTS or tests/vm/artifacts. Per suite, so that the bookworm and the
    trixie suite can run at the same time in one checkout."""
    env = os.environ.get("CRYPTLOCKD_VM_ARTIFACTS")
    base = Path(env) if env else Path(__file__).resolve().parent / "artifacts"
    return base / suite


def unwrap(v: Any) -> Any:
    """busctl --json=short output without its {"type", "data"} wrappers."""
    if isinstance(v, dict) and set(v) == {"type", "data"}:
        return unwrap(v["data"])
    if isinstance(v, dict):
        return {k: unwrap(x) for k, x in v.items()}
    if isinstance(v, list):
        return [unwrap(x) for x in v]
    return v
