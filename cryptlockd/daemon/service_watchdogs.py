"""systemd's service watchdogs, off for the span of a sleep cycle (issue 10, defect 5).

The helper freezes every cgroup but its own and init.scope. PID 1 is not frozen and keeps
counting each frozen service's WatchdogSec= on the monotonic clock (journald, logind and
udevd have 3 minutes), so a user who takes longer at the prompt finds them killed, and a
restarted logind never sends PrepareForSleep(false). The Manager property ServiceWatchdogs
(what `systemctl service-watchdogs no` sets) makes PID 1 log "Watchdog disabled! Ignoring
watchdog timeout" instead of killing (service.c, service_dispatch_watchdog(); shown on
systemd 252 and 257 by tests/vm/test_watchdogs.py). The timer is one-shot and a service's
next WATCHDOG=1 re-arms it, so a service thawed before the restore starts a fresh interval.
PID 1's own RuntimeWatchdogSec= (the hardware watchdog) is another thing, served from
init.scope, which is never frozen.

Why the daemon owns the knob and not the helper: the helper runs stdlib-only from a RAM
filesystem and has no D-Bus client, and mid-cycle dbus-daemon is frozen, so it could set
nothing before the freeze that the daemon cannot set at arm time, on the connection it
already has. The daemon turns it off while the helper arms; logind does not wait for
that, but the helper freezes nothing before the daemon's `watchdogs_off` (issue 12). It
is turned back when the cycle is over (back to idle). The value it replaced is noted
in a file under /run/cryptlockd before it is changed, so that a daemon that died mid-cycle
restores it when it starts again (SPEC 2.7). Only the noted value is put back: a user who
had switched service watchdogs off finds them off.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Protocol

from dbus_fast.aio import MessageBus

from cryptlockd.bus import RemoteInterface
from cryptlockd.defs import (
    RUNTIME_DIR,
    SYSTEMD_BUS_NAME,
    SYSTEMD_MANAGER_INTERFACE,
    SYSTEMD_PATH,
)
from cryptlockd.errors import RemoteError

__all__ = ["PROPERTY", "STATE_FILE", "Knob", "ServiceWatchdogs"]

log = logging.getLogger(__name__)

PROPERTY = "ServiceWatchdogs"
# Under --root, so the host tests never touch the machine's /run.
STATE_FILE = f"{RUNTIME_DIR}/service-watchdogs"
# Inside the arm window (1 s target, logind's 5 s limit); PID 1 answers in milliseconds.
TIMEOUT = 2.0


class Knob(Protocol):
    """The property on the bus (a RemoteInterface of systemd's Manager)."""

    async def get(self, name: str) -> object: ...

    async def set(self, name: str, signature: str, value: object) -> None: ...


def parse_saved(text: str) -> bool | None:
    """The value noted before a cycle turned the watchdogs off; None if unreadable."""
    return {"yes": True, "no": False}.get(text.strip())


class ServiceWatchdogs:
    def __init__(self, systemd: Knob, state_file: Path) -> None:
        self._systemd = systemd
        self.state_file = state_file

    @classmethod
    def on_bus(cls, bus: MessageBus, root: Path) -> ServiceWatchdogs:
        systemd = RemoteInterface(
            bus, SYSTEMD_BUS_NAME, SYSTEMD_PATH, SYSTEMD_MANAGER_INTERFACE, TIMEOUT
        )
        return cls(systemd, root / STATE_FILE.lstrip("/"))

    def _saved(self) -> bool | None:
        try:
            text = self.state_file.read_text()
        except FileNotFoundError:
            return None
        except OSError as e:
            log.error("cannot read %s: %s", self.state_file, e)
            return None
        saved = parse_saved(text)
        if saved is None:
            # Only we write it, and only "yes": assume the systemd default.
            log.warning("%s holds %r; restoring the default (yes)", self.state_file, text[:20])
            return True
        return saved

    async def disable(self) -> None:
        """At arm: service watchdogs off until restore(). Never raises: a failure leaves
        the watchdogs on, which only matters to a user who stays at the prompt longer than
        the shortest WatchdogSec=."""
        try:
            if self._saved() is None:
                if not bool(await self._systemd.get(PROPERTY)):
                    log.info("service watchdogs are off already; left alone")
                    return
                # Noted before the change: a crash right after it still gets repaired.
                self.state_file.parent.mkdir(parents=True, exist_ok=True)
                self.state_file.write_text("yes\n")
            await self._systemd.set(PROPERTY, "b", False)
            log.info("service watchdogs off for the sleep cycle")
        except (RemoteError, OSError) as e:
            log.warning(
                "cannot turn systemd's service watchdogs off for the sleep cycle; a long "
                "wait at the passphrase prompt may get frozen services killed: %s",
                e,
            )

    async def restore(self) -> None:
        """Back to idle, and at start: put back the value disable() replaced, if any.
        Never raises; on failure the note stays, and the next restore() tries again."""
        saved = self._saved()
        if saved is None:
            return
        try:
            if saved:
                await self._systemd.set(PROPERTY, "b", True)
        except RemoteError as e:
            log.error("cannot turn systemd's service watchdogs back on (will retry): %s", e)
            return
        with contextlib.suppress(FileNotFoundError):
            self.state_file.unlink()
        log.info("service watchdogs restored (%s)", "on" if saved else "off")
