"""The daemon's side of the helper: keep the RAM filesystem current, start the helper unit
through systemd, arm it, and hand its cycle record to the daemon.

The helper runs in a unit of its own (cryptlockd-helper.service, in cryptlockd.slice), so
a restart of the daemon cannot kill it mid-cycle; the daemon talks to it over the unix
socket in the ramfs (protocol.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from dbus_fast import BusType, Message, MessageType
from dbus_fast.aio import MessageBus

from cryptlockd.daemon import helper_socket
from cryptlockd.daemon.armer import CycleCallback
from cryptlockd.daemon.config import Config
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.daemon.helper_messages import choose_sleep_state, device_plan, merge_record
from cryptlockd.daemon.ramfs import SIZE_TARGET, Ramfs
from cryptlockd.daemon.repair import repair
from cryptlockd.defs import (
    DBUS_CALL_TIMEOUT,
    PROPERTIES_INTERFACE,
    SYSTEMD_BUS_NAME,
    SYSTEMD_ERROR_NO_SUCH_UNIT,
    SYSTEMD_MANAGER_INTERFACE,
    SYSTEMD_PATH,
    SYSTEMD_UNIT_INTERFACE,
)
from cryptlockd.errors import CryptlockdError
from cryptlockd.helper import protocol

if TYPE_CHECKING:
    from cryptlockd.helper.protocol import ArmedMessage

log = logging.getLogger(__name__)


class HelperError(CryptlockdError):
    def __init__(self, message: str, dbus_error: str | None = None) -> None:
        super().__init__(message)
        self.dbus_error = dbus_error


class HelperArmer:
    def __init__(
        self,
        ramfs: Ramfs | None = None,
        unit: str = protocol.HELPER_UNIT,
        socket_path: str = protocol.SOCKET_PATH,
    ) -> None:
        self.ramfs = ramfs or Ramfs()
        self.unit = unit
        self.socket_path = socket_path
        self.config = Config()
        self._bus: MessageBus | None = None
        self._conn: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._build_lock = threading.Lock()
        self._build_error: str | None = None
        self._builder: threading.Thread | None = None
        self._prestart_task: asyncio.Task[None] | None = None
        self.keyslots: dict[str, int] = {}

    # -- the RAM filesystem -------------------------------------------------------------

    def configure(self, config: Config) -> None:
        self.config = config
        if self._builder is None:
            # Built at start, in the background: a build takes seconds, arming must not.
            self._builder = threading.Thread(
                target=self._ensure_ramfs, daemon=True, name="ramfs-build"
            )
            self._builder.start()
            with contextlib.suppress(RuntimeError):
                loop = asyncio.get_running_loop()
                self._prestart_task = loop.create_task(self._prestart_after_build())

    def _ensure_ramfs(self) -> None:
        with self._build_lock:
            repair(self.ramfs.path, self.socket_path)
            try:
                # An idle helper stands down when told; a busy one (mid-cycle) does not
                # answer, and its tree must stay.
                if (
                    not self.ramfs.current()
                    and helper_socket.alive(self.socket_path)
                    and not helper_socket.stop_idle(self.socket_path)
                ):
                    raise HelperError(
                        "the RAM filesystem is stale, but the helper running from it is busy"
                    )
                if self.ramfs.ensure():
                    log.info("helper RAM filesystem (re)built: %.1f MiB", self.ramfs.size / 2**20)
                self._build_error = None
            except Exception as e:
                self._build_error = str(e)
                log.error("cannot build the helper's RAM filesystem: %s", e)

    async def _prestart_after_build(self) -> None:
        if self._builder is not None:
            await asyncio.to_thread(self._builder.join)
        await self._prestart()

    async def _prestart(self) -> None:
        """Start the helper ahead of the next sleep, so arming only has to talk to it: a
        cold start (systemd, the interpreter, libcryptsetup) costs most of the 1 s budget
        on a slow machine. The idle helper is not locked in memory and holds no VT."""
        if self._build_error:
            return
        try:
            await self._start_unit(time.monotonic() + 10.0)
        except Exception as e:
            log.warning("could not start the helper ahead of time: %s", e)

    def ramfs_status(self) -> tuple[bool, str]:
        """For Check(): (ok, detail with the size)."""
        if self._build_error:
            return False, self._build_error
        if not self.ramfs.size:
            return False, "not built yet"
        return True, (
            f"{self.ramfs.path}: {self.ramfs.size / 2**20:.1f} MiB "
            f"(target {SIZE_TARGET // 2**20} MiB or less)"
        )

    # -- systemd --------------------------------------------------------------------------

    async def _systemd_call(
        self, path: str, interface: str, member: str, signature: str, body: list[Any]
    ) -> Message:
        if self._bus is None or not self._bus.connected:
            self._bus = await asyncio.wait_for(
                MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect(),
                DBUS_CALL_TIMEOUT,
            )
        reply = await asyncio.wait_for(
            self._bus.call(
                Message(
                    destination=SYSTEMD_BUS_NAME,
                    path=path,
                    interface=interface,
                    member=member,
                    signature=signature,
                    body=body,
                )
            ),
            DBUS_CALL_TIMEOUT,
        )
        if reply is None or reply.message_type == MessageType.ERROR:
            detail = reply.body[0] if reply is not None and reply.body else ""
            raise HelperError(
                f"systemd {member} {self.unit}: "
                f"{reply.error_name if reply else 'no reply'} {detail}",
                reply.error_name if reply else None,
            )
        return reply

    async def _systemd(self, member: str, mode: str = "replace") -> None:
        await self._systemd_call(
            SYSTEMD_PATH, SYSTEMD_MANAGER_INTERFACE, member, "ss", [self.unit, mode]
        )

    async def _unit_state(self) -> str:
        """The helper unit's ActiveState; "inactive" when systemd has not loaded it."""
        try:
            reply = await self._systemd_call(
                SYSTEMD_PATH, SYSTEMD_MANAGER_INTERFACE, "GetUnit", "s", [self.unit]
            )
        except HelperError as e:
            if e.dbus_error == SYSTEMD_ERROR_NO_SUCH_UNIT:
                return "inactive"
            raise
        prop = await self._systemd_call(
            str(reply.body[0]),
            PROPERTIES_INTERFACE,
            "Get",
            "ss",
            [SYSTEMD_UNIT_INTERFACE, "ActiveState"],
        )
        return str(prop.body[0].value)

    async def _start_unit(self, deadline: float) -> None:
        """StartUnit, once systemd has seen the last helper go. A helper that has just
        exited no longer accepts connections, but until systemd reaps it the unit is
        still active, and StartUnit on an active unit does nothing: the next sleep would
        find no helper and go unprotected. (Seen in the guest: a cycle right after one.)"""
        while (state := await self._unit_state()) in ("active", "deactivating", "reloading"):
            if helper_socket.alive(self.socket_path):
                return  # a helper runs and listens: nothing to start
            if time.monotonic() >= deadline:
                raise HelperError(f"{self.unit} is still {state} although its helper has exited")
            await asyncio.sleep(0.05)
        await self._systemd("StartUnit")

    # -- arming ---------------------------------------------------------------------------

    async def _connect(self, deadline: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        # The helper creates its socket once it runs; a stale socket file refuses.
        last: Exception | None = None
        while time.monotonic() < deadline:
            try:
                return await asyncio.open_unix_connection(self.socket_path, limit=1 << 20)
            except OSError as e:
                last = e
                await asyncio.sleep(0.01)
        raise HelperError(f"the helper did not open {self.socket_path}: {last}")

    async def arm(self, devices: Sequence[LuksDevice], on_finished: CycleCallback) -> None:
        t0, b0 = time.monotonic(), protocol.boottime()
        deadline = t0 + self.config.cycle.arm_timeout_sec
        if not self.ramfs.current():
            await asyncio.to_thread(self._ensure_ramfs)
            if self._build_error:
                raise HelperError(f"no RAM filesystem for the helper: {self._build_error}")
        await self._close()
        state, mem_sleep = await asyncio.to_thread(choose_sleep_state)
        if not helper_socket.alive(self.socket_path):
            await self._start_unit(deadline)
        reader, writer = await self._connect(deadline)
        prompt = self.config.prompt
        msg = protocol.arm_message(
            device_plan(devices),
            sleep_state=state,
            mem_sleep=mem_sleep,
            vt=prompt.vt,
            freeze_timeout=self.config.cycle.freeze_timeout_sec,
            backoff_initial=prompt.backoff_initial_sec,
            backoff_max=prompt.backoff_max_sec,
            poweroff_after=prompt.max_failures_before_poweroff,
            keyslots=self.keyslots,
        )
        writer.write(protocol.encode(msg))
        await writer.drain()
        line = await asyncio.wait_for(reader.readline(), max(0.1, deadline - time.monotonic()))
        if not line:
            writer.close()
            raise HelperError("the helper closed the connection while arming")
        reply = protocol.decode(line)
        if reply["op"] != protocol.OP_ARMED:
            writer.close()
            raise HelperError(reply["reason"] if reply["op"] == protocol.OP_ERROR else str(reply))
        log.info(
            "helper armed in %.3f s (VT %s, KDF reserve %s KiB, pid %s)",
            time.monotonic() - t0,
            reply["vt"],
            reply["reserve_kib"],
            reply["pid"],
        )
        self._conn = (reader, writer)
        daemon_steps = {"arm_requested": b0, "armed": protocol.boottime()}
        self._reader_task = asyncio.get_running_loop().create_task(
            self._await_record(reader, on_finished, daemon_steps, reply)
        )

    async def _await_record(
        self,
        reader: asyncio.StreamReader,
        on_finished: CycleCallback,
        daemon_steps: dict[str, float],
        armed: ArmedMessage,
    ) -> None:
        buf = protocol.LineBuffer()
        while True:
            data = await reader.read(65536)
            if not data:
                return
            for msg in buf.feed(data):
                if msg["op"] == protocol.OP_RECORD:
                    record = merge_record(msg["record"], daemon_steps, armed)
                    slots = record.get("keyslots")
                    if isinstance(slots, dict):
                        self.keyslots.update(
                            {str(k): v for k, v in slots.items() if isinstance(v, int)}
                        )
                    on_finished(bool(msg["success"]), record)
                    await self._close()
                    await self._restart_idle()
                    return

    async def disarm(self) -> None:
        # PrepareForSleep(false) can be read before the record the helper sent just
        # earlier on our socket: let the reader take it first.
        task = self._reader_task
        if task is not None:
            await asyncio.wait({task}, timeout=1.0)
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn[1].write(protocol.encode({"op": protocol.OP_DISARM}))
                await self._conn[1].drain()
        await self._close()
        with contextlib.suppress(HelperError, TimeoutError):
            await self._systemd("StopUnit")
        await self._restart_idle()

    async def _restart_idle(self) -> None:
        # The helper exits after a cycle or a disarm; a fresh one waits for the next sleep.
        deadline = time.monotonic() + 10.0
        while helper_socket.alive(self.socket_path) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await self._prestart()

    async def _close(self) -> None:
        task, self._reader_task = self._reader_task, None
        if task is not None and task is not asyncio.current_task():
            task.cancel()
        if self._conn is not None:
            writer = self._conn[1]
            self._conn = None
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
