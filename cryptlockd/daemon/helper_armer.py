"""The daemon's armer: start the helper unit through systemd, arm it, and hand its cycle
record to the manager.

The helper runs in a unit of its own (cryptlockd-helper.service, in cryptlockd.slice), so
a restart of the daemon cannot kill it mid-cycle; the daemon talks to it over the unix
socket in the RAM filesystem (helper/protocol.py). An idle helper is started ahead of each
sleep, so arming only has to talk to it.

The RAM filesystem it runs from is kept current by a RamfsKeeper (ramfs_keeper.py), which
swaps a rebuilt tree in only under the arm lock and while no helper is armed or mid-cycle.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from dbus_fast.aio import MessageBus

from cryptlockd.daemon import checks, helper_socket
from cryptlockd.daemon.armer import ArmOptions, CycleCallback, CycleRecord
from cryptlockd.daemon.checks import CheckResult
from cryptlockd.daemon.config import Config
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.daemon.helper_messages import choose_sleep_state, device_plan, merge_record
from cryptlockd.daemon.keyslot_memory import KeyslotMemory, hints, learned
from cryptlockd.daemon.lock_entry import HelperEntry
from cryptlockd.daemon.ramfs import Ramfs
from cryptlockd.daemon.ramfs_keeper import RamfsKeeper
from cryptlockd.daemon.repair import take_recovered_record
from cryptlockd.daemon.systemd_unit import SystemdUnit
from cryptlockd.defs import SYSTEMD_BOOTED_DIR
from cryptlockd.errors import CryptlockdError, RemoteError
from cryptlockd.helper import protocol

if TYPE_CHECKING:
    from cryptlockd.helper.protocol import ArmedMessage, RecordMessage, WatchdogsOffMessage

__all__ = ["HelperArmer", "HelperError"]

log = logging.getLogger(__name__)

# The unit still runs a helper, or has not yet noticed that it exited.
BUSY_STATES = ("active", "deactivating", "reloading")
# How long a helper may take to go, and an idle one to come up, outside the arm window.
IDLE_RESTART_TIMEOUT = 10.0
# How long a started idle helper may take to listen (interpreter, libcryptsetup, headers).
IDLE_LISTEN_TIMEOUT = 30.0
# How long disarm() waits for the helper to go (or for its record): an armed one reads the
# disarm at once. Short: after a failed arm, logind waits on our delay lock meanwhile.
DISARM_WAIT = 1.0
# How long watchdogs_off() waits for the arm's own read of the sleep state (it took 3-10
# ms under TCG; a root that stalls must not hold the cycle up for long, SPEC 2.8).
SLEEP_STATE_WAIT = 1.0

Connection = tuple[asyncio.StreamReader, asyncio.StreamWriter]


class HelperError(CryptlockdError):
    pass


def _read_sleep_state() -> asyncio.Future[tuple[str, str | None]]:
    """choose_sleep_state() in a thread: its files are on the root, which may stall."""
    read = asyncio.ensure_future(asyncio.to_thread(choose_sleep_state))
    read.add_done_callback(lambda f: f.cancelled() or f.exception())
    return read


def _retrieve(future: asyncio.Future[ArmedMessage]) -> None:
    # A failure nobody waits for any more (the arm was given up) is not an error to log.
    if not future.cancelled():
        future.exception()


class HelperArmer:
    def __init__(
        self,
        bus: MessageBus,
        *,
        ramfs: Ramfs | None = None,
        socket_path: str = protocol.SOCKET_PATH,
        under_systemd: bool | None = None,
        keyslots: KeyslotMemory | None = None,
    ) -> None:
        self.unit = SystemdUnit(bus, protocol.HELPER_UNIT)
        self.ramfs = ramfs or Ramfs()
        self.socket_path = socket_path
        if under_systemd is None:
            under_systemd = Path(SYSTEMD_BOOTED_DIR).is_dir()
        # Why this armer can never arm here; None when it can.
        self.unavailable = (
            None if under_systemd else f"not running under systemd (no {SYSTEMD_BOOTED_DIR})"
        )
        self.config = Config()
        # The keyslot that opened each device last (by LUKS UUID), tried first at resume.
        self.keyslots = keyslots or KeyslotMemory(None)
        self.keyslots.load()
        # (state, mem_sleep) as read for the last arm, or ahead of the first (ready()).
        self._sleep_state: tuple[str, str | None] | None = None
        # This arm's own read, when the arm went out with the one above (watchdogs_off()).
        self._sleep_state_read: asyncio.Future[tuple[str, str | None]] | None = None
        self._priming: asyncio.Task[None] | None = None
        # dm name -> LUKS UUID of the devices of the last arm, for its record's keyslots.
        self._armed_uuids: dict[str, str] = {}
        self._saving: set[asyncio.Task[None]] = set()
        self._conn: Connection | None = None
        self._reader_task: asyncio.Task[None] | None = None
        self._on_status_change: Callable[[], None] | None = None
        self._on_recovered: CycleCallback | None = None
        # Held while arming and while swapping trees: a swap never falls in an arm.
        self._tree_lock = asyncio.Lock()
        self.keeper = RamfsKeeper(
            self.ramfs,
            socket_path,
            self._tree_lock,
            armed=lambda: self._conn is not None,
            start_idle=self._prestart,
            helper_exited=self._helper_exited,
            status_changed=self._status_changed,
            recovered=self._recovered_at_start,
        )
        self._idle_error: str | None = None
        self._after_helper: asyncio.Task[None] | None = None

    # -- the RAM filesystem -------------------------------------------------------------

    def configure(self, config: Config) -> None:
        self.config = config
        if self.unavailable is None:
            self.keeper.keep()

    def watch(
        self, on_status_change: Callable[[], None], on_recovered: CycleCallback | None = None
    ) -> None:
        self._on_status_change = on_status_change
        self._on_recovered = on_recovered

    def _status_changed(self) -> None:
        if self._on_status_change is not None:
            self._on_status_change()

    def _recovered_at_start(self, record: CycleRecord) -> None:
        log.warning("the last cycle's helper died and was recovered: %s", record["reason"])
        if self._on_recovered is not None:
            self._on_recovered(False, record)

    async def ready(self) -> None:
        if self.unavailable is None:
            if self._priming is None:
                self._priming = asyncio.get_running_loop().create_task(self._prime())
            await self.keeper.ready()

    async def _prime(self) -> None:
        # The first sleep's arm need not wait for the read either (see _arm).
        try:
            state = await _read_sleep_state()
        except Exception as e:
            log.warning("cannot read the sleep state ahead of the first sleep: %s", e)
            return
        if self._sleep_state is None:
            self._sleep_state = state

    def status(self) -> list[CheckResult]:
        if self.unavailable is not None:
            return [checks.check_helper(self.unavailable)]
        lines = [checks.check_helper(None), *self.keeper.status()]
        if self._idle_error:
            lines.append(checks.check_idle_helper(self._idle_error))
        return lines

    # -- the helper unit ----------------------------------------------------------------

    async def _prestart(self, after_exit: bool = False) -> None:
        """Start the helper ahead of the next sleep, so arming only has to talk to it: a
        cold start (systemd, the interpreter, libcryptsetup) costs most of the 1 s budget
        on a slow machine. The idle helper is locked in memory already, and holds no VT.
        `after_exit`: the last helper is on its way out (after a cycle or a disarm); let
        systemd see it go first."""
        if not self.ramfs.size:
            return
        try:
            if after_exit:
                await self.unit.wait_while(BUSY_STATES, time.monotonic() + IDLE_RESTART_TIMEOUT)
            await self._start_unit(time.monotonic() + IDLE_RESTART_TIMEOUT)
            deadline = time.monotonic() + IDLE_LISTEN_TIMEOUT
            if not await helper_socket.poll_until(self._listening, deadline, every=0.1):
                raise HelperError(f"the idle helper did not listen within {IDLE_LISTEN_TIMEOUT} s")
            error = None
        except Exception as e:
            log.warning("could not start the helper ahead of time: %s", e)
            error = str(e)
        if error != self._idle_error:
            self._idle_error = error
            self._status_changed()

    async def _helper_gone(self) -> None:
        """After a cycle or a disarm: a staged tree goes in first (the keeper then starts
        the idle helper from it), else the idle helper comes back at once. A rebuild that
        failed is tried again: its commands may have timed out while the cycle froze them."""
        if self.keeper.swap_after_cycle():
            return
        await self._prestart(after_exit=True)
        self.keeper.retry_failed_build()

    async def _helper_exited(self) -> None:
        with contextlib.suppress(RemoteError):
            await self.unit.wait_while(BUSY_STATES, time.monotonic() + 24 * 3600)

    async def _listening(self) -> bool | None:
        return helper_socket.alive(self.socket_path) or None

    async def _start_unit(self, deadline: float) -> None:
        """StartUnit, once systemd has seen the last helper go. A helper that has just
        exited no longer accepts connections, but until systemd reaps it the unit is
        still active, and StartUnit on an active unit does nothing: the next sleep would
        find no helper and go unprotected. (Seen in the guest: a cycle right after one.)"""
        while True:
            changed = self.unit.next_change()
            state = await self.unit.active_state()
            if state not in BUSY_STATES:
                await self.unit.start()
                return
            # Active, and nothing listens: a helper still starting up (it will listen), or
            # one that has exited and that systemd has not reaped yet (the state changes).
            if await helper_socket.poll_until(
                self._listening, deadline, every=0.05, unless=changed
            ):
                return  # a helper runs and listens: nothing to start
            if time.monotonic() >= deadline:
                raise HelperError(
                    f"{self.unit.name} is still {state} although its helper has exited"
                )

    async def _connect(self, deadline: float) -> socket.socket:
        # The helper creates its socket once it runs; a stale socket file refuses.
        async def attempt() -> socket.socket | None:
            return helper_socket.connect(self.socket_path)

        sock = await helper_socket.poll_until(attempt, deadline, every=0.01)
        if sock is None:
            raise HelperError(f"the helper did not open {self.socket_path}")
        return sock

    # -- arming ---------------------------------------------------------------------------

    async def arm(
        self,
        devices: Sequence[LuksDevice],
        on_finished: CycleCallback,
        options: ArmOptions | None = None,
    ) -> None:
        options = options or ArmOptions()
        if self.unavailable is not None:
            raise HelperError(self.unavailable)
        t0, b0 = time.monotonic(), protocol.boottime()
        deadline = t0 + self.config.cycle.arm_timeout_sec
        if not self.keeper.tree_ready.is_set():
            # Only before the first build has finished (a sleep at boot, before READY):
            # wait for it within the arm window. A stale tree never waits: it works.
            log.info("arming waits for the helper's RAM filesystem to be built")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.keeper.tree_ready.wait(), deadline - time.monotonic())
        if not self.ramfs.size:
            raise HelperError(
                "no RAM filesystem for the helper: "
                + (self.keeper.build_error or "still being built when the sleep came")
            )
        # A tree swap waits until we are armed and the cycle is over (self._conn).
        async with self._tree_lock:
            options.steps["arm_requested"] = b0
            await self._arm(devices, on_finished, t0, deadline, options)

    def entry(self) -> HelperEntry:
        return HelperEntry(self.socket_path)

    async def _arm(
        self,
        devices: Sequence[LuksDevice],
        on_finished: CycleCallback,
        t0: float,
        deadline: float,
        options: ArmOptions,
    ) -> None:
        daemon_steps = options.steps
        await self._close()
        # The sleep state is read for each sleep, as systemd-sleep does. In a thread: its
        # files are on the root, which may stall, and the manager's bound on the arm must
        # still hold (SPEC 2.8). The arm does not wait for it when there is one read
        # before (for the last sleep, or ahead of the first): a thread's read took 25-40
        # ms of logind's wait under TCG (issue 12). Then it starts once the arm is out,
        # not to hold the GIL while we send; should it differ, it reaches the helper with
        # watchdogs_off(), which the helper waits for before it freezes anything. Read
        # first when nothing was read before, or when there is no watchdogs_off() to bring
        # a change (a Lock(), which does not sleep anyway).
        first = self._sleep_state is None or not options.watchdogs_pending
        sleep_state = _read_sleep_state() if first else None
        self._sleep_state_read = None
        sock: socket.socket | None = None
        try:
            sock = helper_socket.connect(self.socket_path)
            if sock is None:  # no idle helper: start one
                await self._start_unit(deadline)
                sock = await self._connect(deadline)
            if sleep_state is not None:
                self._sleep_state = await sleep_state
            assert self._sleep_state is not None
            state, mem_sleep = self._sleep_state
        except BaseException:
            if sleep_state is not None:
                sleep_state.cancel()
            if sock is not None:
                sock.close()  # no arm sent on it yet
            raise
        # Nothing yields from here until the arm is out: each turn of the event loop
        # around a sleep cost milliseconds under TCG (issue 12).
        prompt, cycle = self.config.prompt, self.config.cycle
        msg = protocol.arm_message(
            device_plan(devices),
            sleep_state=state,
            mem_sleep=mem_sleep,
            vt=prompt.vt,
            freeze_timeout=cycle.freeze_timeout_sec,
            sync_timeout=cycle.sync_timeout_sec,
            syncfs_timeout=cycle.syncfs_timeout_sec,
            backoff_initial=prompt.backoff_initial_sec,
            backoff_max=prompt.backoff_max_sec,
            poweroff_after=prompt.max_failures_before_poweroff,
            poweroff_locked_after=prompt.poweroff_after_wake_sec,
            unanswered_wake_after=prompt.unanswered_wake_sleep_sec,
            keyslots=hints(self.keyslots.slots, devices),
            sleeps=options.sleeps,
            drop_page_cache=cycle.drop_page_cache,
            watchdogs_pending=options.watchdogs_pending,
        )
        self._armed_uuids = {d.name: d.uuid for d in devices}
        try:
            sock.sendall(protocol.encode(msg))
            daemon_steps["arm_sent"] = protocol.boottime()
            if not first:
                self._sleep_state_read = _read_sleep_state()
            sock.setblocking(False)
            reader, writer = await asyncio.open_unix_connection(sock=sock, limit=1 << 20)
        except BaseException:
            # The helper may have the arm, and nothing would read its answer: it must not
            # stay armed for a sleep given up (issue 10, defect 7).
            with contextlib.suppress(OSError):
                sock.settimeout(1.0)
                sock.sendall(protocol.encode({"op": protocol.OP_DISARM}))
            sock.close()
            raise
        # The connection is ours from here until the helper ends it, and one reader takes
        # all it says. Should this arm be cancelled (the manager's timeout) after the
        # helper read it, disarm() still finds the connection, and the reader passes on
        # whatever the helper says after all (issue 10, defect 7).
        self._conn = (reader, writer)
        loop = asyncio.get_running_loop()
        armed: asyncio.Future[ArmedMessage] = loop.create_future()
        armed.add_done_callback(_retrieve)
        self._reader_task = loop.create_task(
            self._read_helper(reader, writer, on_finished, daemon_steps, armed, options.on_armed)
        )
        reply = await asyncio.wait_for(asyncio.shield(armed), max(0.1, deadline - time.monotonic()))
        log.info(
            "helper armed in %.3f s (VT %s, KDF reserve %s KiB, pid %s)",
            time.monotonic() - t0,
            reply["vt"],
            reply["reserve_kib"],
            reply["pid"],
        )

    async def _read_helper(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        on_finished: CycleCallback,
        daemon_steps: dict[str, float],
        armed: asyncio.Future[ArmedMessage],
        on_armed: Callable[[], None] | None = None,
    ) -> None:
        """All the helper says on the arm connection: `armed` (or `error`), then the
        record. Once it has ended the connection: a record the recovery left if it died
        mid-cycle, and a fresh idle helper."""
        buf = protocol.LineBuffer()
        reply: ArmedMessage | None = None
        record: RecordMessage | None = None
        try:
            while record is None and (data := await reader.read(65536)):
                for msg in buf.feed(data):
                    if msg["op"] == protocol.OP_ARMED:
                        reply = msg
                        daemon_steps["armed"] = protocol.boottime()
                        if armed.done():
                            log.warning("the helper armed after the arm was given up")
                        else:
                            armed.set_result(msg)
                            if on_armed is not None:
                                # At once, not once the arm's coroutine gets its turn
                                # (logind's wait, issue 12).
                                on_armed()
                    elif msg["op"] == protocol.OP_ERROR and not armed.done():
                        armed.set_exception(HelperError(msg["reason"]))
                    elif msg["op"] == protocol.OP_RECORD:
                        record = msg
                        break
        except (OSError, protocol.ProtocolError) as e:
            log.error("reading from the helper: %s", e)
        if not armed.done():
            armed.set_exception(HelperError("the helper closed the connection while arming"))
        if record is not None:
            self._pass_record(record, on_finished, daemon_steps, reply)
        else:
            # The helper went away without a record: if it died mid-cycle, the recovery
            # (its unit's ExecStopPost=, or its watchdog) left one before it let us run.
            recovered = take_recovered_record(self.ramfs.path)
            if recovered is not None:
                log.warning("the helper died mid-cycle and was recovered: %s", recovered["reason"])
                on_finished(False, recovered)
        self._helper_left(writer)

    def _pass_record(
        self,
        msg: RecordMessage,
        on_finished: CycleCallback,
        daemon_steps: dict[str, float],
        armed: ArmedMessage | None,
    ) -> None:
        record = merge_record(msg["record"], daemon_steps, armed)
        slots = learned(self.keyslots.slots, self._armed_uuids, record.get("keyslots"))
        if slots != self.keyslots.slots:
            self.keyslots.slots = slots
            # In a thread: the state directory's disk may stall, the bus must not.
            task = asyncio.get_running_loop().create_task(
                asyncio.to_thread(self.keyslots.save, dict(slots))
            )
            self._saving.add(task)
            task.add_done_callback(self._saving.discard)
        on_finished(bool(msg["success"]), record)

    def _helper_left(self, writer: asyncio.StreamWriter) -> None:
        """The helper ended our connection (record, disarm, its own timeout, death)."""
        writer.close()
        if self._conn is not None and self._conn[1] is writer:
            self._conn, self._reader_task = None, None
        self._after_helper = asyncio.get_running_loop().create_task(self._helper_gone())

    async def watchdogs_off(self) -> None:
        msg: WatchdogsOffMessage = {"op": protocol.OP_WATCHDOGS_OFF}
        changed = await self._sleep_state_changed()
        if changed is not None:
            msg["sleep_state"], msg["mem_sleep"] = changed
        if self._conn is None:
            return  # the helper is gone already (its record, a disarm)
        writer = self._conn[1]
        try:
            writer.write(protocol.encode(msg))
            await writer.drain()
        except OSError as e:
            # It then waits its few seconds (protocol.WATCHDOGS_WAIT) and freezes anyway.
            log.warning("could not tell the helper that the service watchdogs are off: %s", e)

    async def _sleep_state_changed(self) -> tuple[str, str | None] | None:
        """This arm's own read of the sleep state, when it differs from the one the arm
        went out with; None when it does not, or when it could not be read in time (the
        one read before stands: a sleep.conf the read chokes on costs no protection)."""
        read, self._sleep_state_read = self._sleep_state_read, None
        if read is None:
            return None
        try:
            state = await asyncio.wait_for(asyncio.shield(read), SLEEP_STATE_WAIT)
        except Exception as e:
            read.cancel()
            why = str(e) or f"not read within {SLEEP_STATE_WAIT:g} s"
            log.warning("cannot read the sleep state again (%s): the one read before stands", why)
            return None
        if state == self._sleep_state:
            return None
        log.info("the sleep state changed since it was last read: %s, mem_sleep %s", *state)
        self._sleep_state = state
        return state

    async def disarm(self) -> bool:
        if self.unavailable is not None:
            return True
        task = self._reader_task
        if task is None or task.done() or self._conn is None:
            return True
        # An armed helper reads this at once and exits; one still arming, as soon as it
        # has armed, before anything the sleep entry says. A record it sent before is
        # read first (the reader takes it, and the helper never reads this).
        with contextlib.suppress(OSError):
            self._conn[1].write(protocol.encode({"op": protocol.OP_DISARM}))
            await self._conn[1].drain()
        done, _ = await asyncio.wait({task}, timeout=DISARM_WAIT)
        if task in done:
            return True
        log.warning(
            "the helper did not stand down within %s s: it runs a cycle (its record will "
            "tell), or is still arming (it stands down as soon as it has armed)",
            DISARM_WAIT,
        )
        return False

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
