"""The sd_notify protocol: READY, STATUS, STOPPING and watchdog pings.

NOTIFY_SOCKET and the watchdog variables are read once and removed from os.environ, so
no child (or anything else reading the environment) can report to systemd on our behalf.
That is also why the datagrams are sent here and not with systemd.daemon.notify():
libsystemd looks the socket up in the environment on every call, and the variable is
gone by then. The protocol is one datagram of NEWLINE-separated KEY=VALUE pairs.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

log = logging.getLogger(__name__)

# A week: longer than anyone sits at the resume prompt, short enough to still catch a
# daemon that hangs for good.
SLEEP_WATCHDOG_USEC = 7 * 24 * 3600 * 1_000_000


class Notifier:
    def __init__(self, address: str | None, watchdog_usec: int | None) -> None:
        self._address = address
        self.watchdog_usec = watchdog_usec
        self._task: asyncio.Task[None] | None = None

    @classmethod
    def from_environment(cls) -> Notifier:
        address = os.environ.pop("NOTIFY_SOCKET", None) or None
        usec_text = os.environ.pop("WATCHDOG_USEC", None)
        pid_text = os.environ.pop("WATCHDOG_PID", None)
        usec: int | None = None
        if usec_text:
            try:
                usec = int(usec_text)
            except ValueError:
                log.warning("ignoring WATCHDOG_USEC=%r", usec_text)
            # The watchdog may be meant for another process (our parent, say).
            if pid_text and pid_text != str(os.getpid()):
                usec = None
        return cls(address, usec if usec and usec > 0 else None)

    @property
    def enabled(self) -> bool:
        return self._address is not None

    def notify(self, **fields: str) -> None:
        if self._address is None:
            return
        payload = "\n".join(f"{k}={v}" for k, v in fields.items()).encode()
        # Abstract sockets are written with a leading '@'.
        addr = "\0" + self._address[1:] if self._address.startswith("@") else self._address
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(payload, addr)
        except OSError as e:
            log.warning("sd_notify to %s failed: %s", self._address, e)

    def ready(self, status: str) -> None:
        self.notify(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        self.notify(STATUS=status)

    def stopping(self) -> None:
        self.notify(STOPPING="1", STATUS="Stopping")

    def suspend_watchdog(self) -> None:
        """For the sleep cycle: the helper freezes our cgroup, and PID 1's too, and then
        waits at the passphrase prompt for as long as the user takes. systemd measures the
        watchdog on the monotonic clock, which runs while we are frozen, so on thaw it
        would find us overdue and kill us mid-report. Stretch the timeout (WATCHDOG_USEC=
        at runtime, systemd >= 236) until restore_watchdog()."""
        if self.watchdog_usec is not None:
            self.notify(WATCHDOG="1", WATCHDOG_USEC=str(SLEEP_WATCHDOG_USEC))

    def restore_watchdog(self) -> None:
        if self.watchdog_usec is not None:
            self.notify(WATCHDOG_USEC=str(self.watchdog_usec), WATCHDOG="1")

    def start_watchdog(self) -> None:
        """Ping at half the interval from the event loop: a loop stuck in something
        blocking misses its pings and systemd restarts us, as it should."""
        if self.watchdog_usec is None or self._address is None:
            return
        interval = self.watchdog_usec / 2e6

        async def ping() -> None:
            while True:
                self.notify(WATCHDOG="1")
                await asyncio.sleep(interval)

        self._task = asyncio.get_running_loop().create_task(ping())

    def stop_watchdog(self) -> None:
        if self._task is not None:
            self._task.cancel()
            self._task = None
