"""The helper's socket: who may say what, and when.

The daemon connects and sends `arm` (answered `armed`, or `error`), and keeps that
connection for the record; `disarm` on it, or on a new one, stands the helper down. The
sleep entry (systemd-suspend.service) connects and sends `begin` (answered `ready`), `sleep`
(answered `resumed`, once the cycle ran) and `finish` (answered `done`), and the helper
exits. Nothing stops it half-way through a cycle (drive_cycle ignores the usual signals).
"""

from __future__ import annotations

import contextlib
import select
import signal
import time

from cryptlockd.helper import protocol
from cryptlockd.helper.journal import ERR, INFO, WARNING, log
from cryptlockd.helper.recover import start_watchdog

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    import _socket
    import socket

    from cryptlockd.helper.protocol import Message
    from cryptlockd.helper.session import Helper

# Armed but no sleep came: stand down (the daemon re-arms on the next PrepareForSleep).
ARMED_IDLE_TIMEOUT = 120.0
# How long a new connection has to say what it wants.
FIRST_MESSAGE_TIMEOUT = 5.0


def _refuse(conn: protocol.Channel, reason: str) -> None:
    conn.send({"op": protocol.OP_ERROR, "reason": reason})
    conn.close()


def begin_mismatch(sleeps: bool, lock: bool) -> str:
    """Why this `begin` may not start the cycle armed, or "". A sleep entry that comes
    while the helper is armed for a lock (logind's sleep raced the daemon's Lock()) must
    not start the lock's cycle, nor the daemon's lock entry a sleep's."""
    if lock and sleeps:
        return "armed for a sleep, not a lock"
    if not lock and not sleeps:
        return "armed for a lock, not a sleep"
    return ""


def serve(helper: Helper, listener: socket.socket) -> int:
    daemon: protocol.Channel | None = None
    armed_at: float | None = None
    while True:
        watch: list[_socket.socket] = [listener] + ([daemon.sock] if daemon else [])
        timeout = (
            None if armed_at is None else max(0.0, armed_at + ARMED_IDLE_TIMEOUT - time.monotonic())
        )
        ready, _, _ = select.select(watch, [], [], timeout)
        if not ready:
            log(WARNING, "armed, but no sleep came: standing down")
            return 0
        if daemon is not None and daemon.sock in ready:
            try:
                msg = daemon.receive(0)
            except protocol.ProtocolError as e:
                log(WARNING, f"ignoring a bad message from the daemon: {e}")
                continue
            if msg is None:
                # The daemon went away (restart): stay armed for the sleep it may have
                # let through; the record then only reaches the journal.
                log(WARNING, "the daemon closed its connection; staying armed")
                helper.daemon = None
                daemon = None
            elif msg["op"] == protocol.OP_DISARM:
                log(INFO, "disarmed")
                return 0
            elif msg["op"] == protocol.OP_WATCHDOGS_OFF:
                helper.watchdogs_off(msg)
            continue
        sock, _ = listener.accept()
        conn = protocol.Channel(sock)
        try:
            msg = conn.receive(FIRST_MESSAGE_TIMEOUT)
        except protocol.ProtocolError as e:
            _refuse(conn, str(e))
            continue
        if msg is None:
            conn.close()
            continue
        if msg["op"] == protocol.OP_ARM:
            try:
                reply = helper.arm(msg)
            except Exception as e:
                log(ERR, f"arming failed: {e}")
                _refuse(conn, f"arming failed: {e}")
                continue
            try:
                conn.send(reply)
            except OSError as e:
                # The daemon gave the arm up before it could read the answer.
                log(WARNING, f"the daemon left before it was told armed ({e}): standing down")
                return 0
            if not helper.watchdog:
                # Armed, nothing frozen or suspended yet: the watchdog must need nobody
                # (not even PID 1) should we die mid-cycle (recover.py).
                helper.watchdog = start_watchdog()
            helper.start_sync_worker()
            # Last: it starts a thread, and a fork after that would copy a process
            # whose other thread holds what it holds.
            helper.take_reserve()
            log(
                INFO,
                f"armed: devices {', '.join(helper.devices)}, VT {reply['vt']}, "
                f"KDF reserve {reply['reserve_kib']} KiB",
            )
            daemon, helper.daemon, armed_at = conn, conn, time.monotonic()
        elif msg["op"] == protocol.OP_DISARM:
            log(INFO, "told to stand down")
            return 0
        elif msg["op"] == protocol.OP_BEGIN:
            if armed_at is None:
                _refuse(conn, "not armed")
                continue
            if helper.reserve_error:
                _refuse(conn, helper.reserve_error)
                continue
            mismatch = begin_mismatch(helper.sleeps, bool(msg.get("lock", False)))
            if mismatch:
                _refuse(conn, mismatch)
                continue
            return drive_cycle(helper, conn)
        else:
            _refuse(conn, f"unexpected {msg['op']!r}")


def _from_entry(entry: protocol.Channel) -> Message | None:
    """The sleep entry's next message; None if it went away or sent what we cannot read."""
    try:
        return entry.receive()
    except protocol.ProtocolError as e:
        log(ERR, f"a bad message from the sleep entry: {e}")
        return None


def drive_cycle(helper: Helper, entry: protocol.Channel) -> int:
    # From here on the devices may be suspended: nothing may stop us half-way.
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)
    entry.send(helper.begin())
    msg = _from_entry(entry)
    if msg is not None and msg["op"] == protocol.OP_SLEEP:
        reply = helper.sleep(msg)
        with contextlib.suppress(OSError):
            entry.send(reply)
        msg = _from_entry(entry)
    else:
        helper.record.fail("the sleep entry went away before the sleep")
    helper.finish(msg if msg is not None and msg["op"] == protocol.OP_FINISH else None)
    helper.report()
    with contextlib.suppress(OSError):
        entry.send({"op": protocol.OP_DONE, "success": helper.record.success})
    return 0
