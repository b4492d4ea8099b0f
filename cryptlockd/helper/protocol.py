"""The one contract between the daemon, the sleep entry and the helper.

Messages are JSON objects, one a line, over the unix socket the helper listens on in its
RAM filesystem. This module holds everything the three processes must agree on: the
messages (a TypedDict each), the defaults of the cycle's settings, the paths in the RAM
filesystem, the blocking channel the helper and the sleep entry talk through, and the clock
the cycle record uses. No message ever carries a passphrase.

It is imported by the helper in isolated mode from the RAM filesystem, so it uses the stdlib
only, and its types exist for the type checker alone.

Conversations:
- daemon -> helper: `arm` -> `armed` (or `error`); later the helper sends `record` on that
  connection. `disarm` stands an armed or idle helper down.
- sleep entry -> helper: `begin` -> `ready` (VT switched; run the pre hooks now), `sleep`
  -> `resumed` (the cycle ran, devices are back, cgroups thawed), `finish` -> `done` (post
  hooks ran, VT switched back, record sent).
"""

from __future__ import annotations

import _socket
import select
import time

from cryptlockd.helper import jsonline

TYPE_CHECKING = False  # typing stays out of the helper's closure; see cycle.py
if TYPE_CHECKING:
    from typing import Any, Final, Literal, NotRequired, TypedDict

    class DevicePlanEntry(TypedDict):
        name: str
        uuid: str
        # "passphrase", or "keyfile:<path on the real root>"
        key_source: str
        keyfile_size: int
        keyfile_offset: int
        # Holds /, /usr, /var or swap, or is needed by a device that does (SPEC 2.8):
        # nothing is thawed while it is suspended, and it cannot be skipped. Absent (an
        # older daemon): essential.
        essential: bool
        # The plan's devices that must be back before this one (daemon/device_graph.py).
        after: list[str]
        # crypttab's header=: a detached header, a path on the real root; "" for none.
        header: str
        # Its mount points, through any layers above it: the prompt screen names the disk
        # by them. Absent (an older daemon): none shown.
        mounts: list[str]

    class ArmMessage(TypedDict):
        op: Literal["arm"]
        devices: list[DevicePlanEntry]  # in suspend order, upper layers first
        sleep_state: str
        mem_sleep: str | None
        vt: int
        freeze_timeout: float
        # sync() before the freeze, and each syncfs() after it, in seconds (SPEC 2.4, 2.8).
        # Not in REQUIRED_KEYS: an older daemon's arm message gets the defaults.
        sync_timeout: float
        syncfs_timeout: float
        backoff_initial: float
        backoff_max: float
        poweroff_after: int
        # Seconds after a wake: power off when still locked (0: never); go back to sleep
        # when the lid stayed shut and no key was touched (0: never). Not in
        # REQUIRED_KEYS: an older daemon's arm message gets the defaults.
        poweroff_locked_after: float
        unanswered_wake_after: float
        # dm name -> the keyslot that took the passphrase last time: tried first.
        keyslots: dict[str, int]
        # False for Lock(): the whole cycle but the sleep write. Absent: True.
        sleeps: bool
        # Drop the clean page cache (and scrub the freed pages) before the suspend.
        # Absent: False.
        drop_page_cache: bool
        # The daemon is still turning PID 1's service watchdogs off (it lets logind go
        # on without waiting for that): nothing is frozen before its `watchdogs_off`, or
        # WATCHDOGS_WAIT. Absent: False.
        watchdogs_pending: bool

    class ArmedMessage(TypedDict):
        op: Literal["armed"]
        vt: int
        reserve_kib: int
        pid: int

    class RecordMessage(TypedDict):
        op: Literal["record"]
        success: bool
        record: dict[str, Any]

    class DisarmMessage(TypedDict):
        op: Literal["disarm"]

    class WatchdogsOffMessage(TypedDict):
        # The daemon is done with PID 1's service watchdogs (off, or it could not): the
        # helper may freeze.
        op: Literal["watchdogs_off"]
        # The sleep state read for this sleep, when it differs from the arm's (which went
        # out with the one read for the last sleep; daemon/helper_armer.py).
        sleep_state: NotRequired[str]
        mem_sleep: NotRequired[str | None]

    class BeginMessage(TypedDict):
        op: Literal["begin"]
        # True from the daemon's lock entry (daemon/lock_entry.py), which alone may begin a
        # cycle armed without the sleep write; a sleep entry may begin only one with it.
        # Absent: False.
        lock: bool

    class ReadyMessage(TypedDict):
        op: Literal["ready"]

    class SleepMessage(TypedDict):
        op: Literal["sleep"]
        times: dict[str, float]  # the sleep entry's steps, CLOCK_BOOTTIME seconds

    class ResumedMessage(TypedDict):
        op: Literal["resumed"]
        slept: bool
        reason: str

    class FinishMessage(TypedDict):
        op: Literal["finish"]
        times: dict[str, float]

    class DoneMessage(TypedDict):
        op: Literal["done"]
        success: bool

    class ErrorMessage(TypedDict):
        op: Literal["error"]
        reason: str

    class StockSleepTrace(TypedDict):
        """What the sleep entry leaves in STOCK_SLEEP_TRACE before it runs the stock
        systemd-sleep: the daemon reports that sleep as unprotected."""

        reason: str
        boottime: float

    Message = (
        ArmMessage
        | ArmedMessage
        | RecordMessage
        | DisarmMessage
        | WatchdogsOffMessage
        | BeginMessage
        | ReadyMessage
        | SleepMessage
        | ResumedMessage
        | FinishMessage
        | DoneMessage
        | ErrorMessage
    )

# -- operations -------------------------------------------------------------------------

OP_ARM: Final = "arm"
OP_ARMED: Final = "armed"
OP_RECORD: Final = "record"
OP_DISARM: Final = "disarm"
OP_WATCHDOGS_OFF: Final = "watchdogs_off"
OP_BEGIN: Final = "begin"
OP_READY: Final = "ready"
OP_SLEEP: Final = "sleep"
OP_RESUMED: Final = "resumed"
OP_FINISH: Final = "finish"
OP_DONE: Final = "done"
OP_ERROR: Final = "error"

# The keys each message must carry besides "op": checked on decode, so a peer of another
# version fails with a clear error instead of a KeyError half-way through a cycle.
REQUIRED_KEYS: dict[str, tuple[str, ...]] = {
    OP_ARM: (
        "devices",
        "sleep_state",
        "mem_sleep",
        "vt",
        "freeze_timeout",
        "backoff_initial",
        "backoff_max",
        "poweroff_after",
        "keyslots",
    ),
    OP_ARMED: ("vt", "reserve_kib", "pid"),
    OP_RECORD: ("success", "record"),
    OP_DISARM: (),
    OP_WATCHDOGS_OFF: (),
    OP_BEGIN: (),
    OP_READY: (),
    OP_SLEEP: ("times",),
    OP_RESUMED: ("slept", "reason"),
    OP_FINISH: ("times",),
    OP_DONE: ("success",),
    OP_ERROR: ("reason",),
}

# -- the cycle's settings: defaults shared by the config, the daemon and the helper -------

DEFAULT_VT = 0  # 0: the first free VT
DEFAULT_FREEZE_TIMEOUT = 10.0
# Everything still runs during the sync(), and a slow disk may hold a lot of dirty data;
# the syncfs() calls after the freeze have only what was written since.
DEFAULT_SYNC_TIMEOUT = 60.0
DEFAULT_SYNCFS_TIMEOUT = 20.0
DEFAULT_BACKOFF_INITIAL = 1.0
DEFAULT_BACKOFF_MAX = 30.0
DEFAULT_POWEROFF_AFTER = 0  # 0: never
# Off by default: a machine that powers itself off loses whatever was not saved. 1800 s
# (30 min) is the value the docs suggest.
DEFAULT_POWEROFF_LOCKED_AFTER = 0.0
# Long enough to find the keyboard after opening the lid, short enough that a laptop woken
# in a bag (an RTC alarm, a spurious wake) does not stay awake for long.
DEFAULT_UNANSWERED_WAKE_AFTER = 60.0
# How long the helper waits for the daemon's `watchdogs_off` before it freezes all the
# same: the daemon gives the switch 1 s (sleep_cycle.WATCHDOGS_SWITCH_TIMEOUT).
WATCHDOGS_WAIT = 3.0
# How long the cycle waits, everything frozen, for the KDF reserve's thread before it
# suspends the devices all the same (reserve.py; SPEC 2.8): tenths of a second normally,
# longer only when the memory comes from reclaim.
RESERVE_WAIT = 10.0

# -- the RAM filesystem -----------------------------------------------------------------

HELPER_UNIT = "cryptlockd-helper.service"
# Where the daemon mounts it; the helper unit's RootDirectory=.
RAMFS_DIR = "/run/cryptlockd/ramfs"
# Mount points and directories the tree needs, relative to its root.
RAMFS_DIRS = ("proc", "sys", "dev", "run", "run/cryptsetup", "tmp", "sock", "state")
# Paths as the helper sees them (inside its root). on_host() gives the daemon's view.
SOCKET_IN_RAMFS = "/sock/helper.sock"
# What a cycle changed and must be undone should the helper die: the cgroups it froze
# (written before freezing), and the sync_on_suspend and rcu_expedited values it replaced.
FROZEN_STATE_IN_RAMFS = "/state/frozen"
SYNC_STATE_IN_RAMFS = "/state/sync_on_suspend"
RCU_STATE_IN_RAMFS = "/state/rcu_expedited"
# The rest of what the recovery of a dead helper needs (recover.py): the device plan, the
# VT, the prompt's settings and the devices it may have suspended (each written before its
# crypt_suspend). JSON; removed once the cycle has thawed.
CYCLE_STATE_IN_RAMFS = "/state/cycle.json"
# The record of a cycle the recovery finished, for the daemon to report (LastCycle,
# CycleFinished) when it notices the helper is gone, or at its next start.
RECOVERED_RECORD_IN_RAMFS = "/state/recovered.json"
# Held by whichever recovery runs (the helper's watchdog, the unit's ExecStopPost=), so
# the other waits and then finds nothing left to do.
RECOVERY_LOCK_IN_RAMFS = "/state/recovery.lock"
# The console loglevel the prompt found (vt.kernel_messages_off), while it has it lowered:
# a recovery after a helper that died at the prompt puts that one back, not the lowered.
LOGLEVEL_STATE_IN_RAMFS = "/state/console_loglevel"
# Test hook, root-only, on the real root's /run (the helper reads it through /proc/1/root
# when armed, and removes it: one cycle only). Names the step at which the helper SIGKILLs
# itself ("after-freeze", "after-first-suspend", "at-prompt") or hangs up its VT
# ("hangup-at-prompt"). Documented in cryptlockd(8).
FAULT_HOOK = "/run/cryptlockd/debug-helper-fault"
FAULTS = ("after-freeze", "after-first-suspend", "at-prompt", "hangup-at-prompt")


# Outside the RAM filesystem, on the real root's /run (the daemon's RuntimeDirectory=): the
# sleep entry writes it just before it falls back to the stock systemd-sleep, the daemon
# takes it (reads and removes it) when the sleep is over, or at its start if it was not
# running. JSON, a StockSleepTrace.
STOCK_SLEEP_TRACE = "/run/cryptlockd/stock-sleep.json"


def on_host(path_in_ramfs: str, ramfs: str = RAMFS_DIR) -> str:
    return ramfs + path_in_ramfs


SOCKET_PATH = on_host(SOCKET_IN_RAMFS)

MAX_LINE = 1 << 20


def boottime() -> float:
    """The cycle record's clock. Unlike CLOCK_MONOTONIC it counts while the machine sleeps,
    and all three processes read the same one, so their steps merge into one timeline."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


# -- encoding ---------------------------------------------------------------------------


class ProtocolError(Exception):
    pass


def encode(msg: Message) -> bytes:
    if not isinstance(msg.get("op"), str):
        raise ProtocolError("a message needs a string 'op'")
    try:
        return jsonline.dumps(msg).encode() + b"\n"
    except TypeError as e:
        raise ProtocolError(f"cannot encode {msg['op'][:40]!r}: {e}") from e


def decode(line: bytes) -> Message:
    try:
        msg = jsonline.loads(line.decode())
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not a JSON line: {e}") from e
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("a message must be an object with a string 'op'")
    required = REQUIRED_KEYS.get(msg["op"])
    if required is None:
        raise ProtocolError(f"unknown message {msg['op'][:40]!r}")
    missing = [k for k in required if k not in msg]
    if missing:
        raise ProtocolError(f"{msg['op']!r} message without {', '.join(missing)}")
    return msg  # type: ignore[return-value]  # checked above, as far as a peer can be


class LineBuffer:
    """Collects bytes from a stream and yields complete messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if line.strip():
                out.append(decode(line))
        if len(self._buf) > MAX_LINE:
            raise ProtocolError("line too long")
        return out


def arm_message(
    devices: list[DevicePlanEntry],
    *,
    sleep_state: str,
    mem_sleep: str | None,
    vt: int,
    freeze_timeout: float,
    sync_timeout: float = DEFAULT_SYNC_TIMEOUT,
    syncfs_timeout: float = DEFAULT_SYNCFS_TIMEOUT,
    backoff_initial: float,
    backoff_max: float,
    poweroff_after: int,
    poweroff_locked_after: float = DEFAULT_POWEROFF_LOCKED_AFTER,
    unanswered_wake_after: float = DEFAULT_UNANSWERED_WAKE_AFTER,
    keyslots: dict[str, int],
    sleeps: bool = True,
    drop_page_cache: bool = False,
    watchdogs_pending: bool = False,
) -> ArmMessage:
    return {
        "op": OP_ARM,
        "devices": devices,
        "sleep_state": sleep_state,
        "mem_sleep": mem_sleep,
        "vt": vt,
        "freeze_timeout": freeze_timeout,
        "sync_timeout": sync_timeout,
        "syncfs_timeout": syncfs_timeout,
        "backoff_initial": backoff_initial,
        "backoff_max": backoff_max,
        "poweroff_after": poweroff_after,
        "poweroff_locked_after": poweroff_locked_after,
        "unanswered_wake_after": unanswered_wake_after,
        "keyslots": dict(keyslots),
        "sleeps": sleeps,
        "drop_page_cache": drop_page_cache,
        "watchdogs_pending": watchdogs_pending,
    }


# -- the blocking channel (the helper's and the sleep entry's side) ---------------------


class Channel:
    """One connection, message by message. The daemon's side is asyncio (LineBuffer)."""

    # _socket's type: the sleep entry connects without the socket module (connect below),
    # the helper accepts with it (socket.socket is a subclass).
    def __init__(self, sock: _socket.socket) -> None:
        self.sock = sock
        self._buffer = LineBuffer()
        self._pending: list[Message] = []
        # The peer closed (or the socket failed): receive() returns None for good, and
        # that None is not a timeout.
        self.ended = False

    def send(self, msg: Message) -> None:
        self.sock.sendall(encode(msg))

    def receive(self, timeout: float | None = None) -> Message | None:
        """The next message; None at end of stream, on a socket error (both set `ended`),
        or when `timeout` seconds pass first (None: wait as long as it takes). A malformed
        line raises ProtocolError."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while not self._pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self.sock], [], [], left)
            if not ready:
                return None
            try:
                data = self.sock.recv(65536)
            except OSError:
                data = b""
            if not data:
                self.ended = True
                return None
            self._pending.extend(self._buffer.feed(data))
        return self._pending.pop(0)

    def close(self) -> None:
        self.sock.close()


def connect(path: str = SOCKET_PATH, timeout: float = 2.0) -> Channel | None:
    """A channel to the helper's socket; None when nothing listens there."""
    # _socket, not socket: the sleep entry's start does without the module's enums.
    sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM | _socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return Channel(sock)
