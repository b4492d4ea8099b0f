"""cryptlockd-notify: started with the graphical session (a user unit, or XDG autostart).

Exit status: 0 when stopped by SIGTERM or SIGINT, 1 when a bus cannot be reached or is
lost (the user unit restarts it), 2 for a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys
from collections.abc import Sequence

from dbus_fast import BusType, DBusError
from dbus_fast.aio import MessageBus

from cryptlockd import __version__, bus
from cryptlockd.defs import DBUS_CALL_TIMEOUT, NOTIFY_AGENT_BUS_NAME
from cryptlockd.desktop.agent import DaemonWatch, Notifier
from cryptlockd.errors import RemoteError

__all__ = ["main"]

PROG = "cryptlockd-notify"
log = logging.getLogger(__name__)

# org.freedesktop.DBus.RequestName's flag and replies (the D-Bus specification).
REQUEST_NAME_DO_NOT_QUEUE = 4
REQUEST_NAME_PRIMARY_OWNER = 1
REQUEST_NAME_ALREADY_OWNER = 4


class AgentError(Exception):
    """One readable line for stderr; exit status 1."""


async def connect(bus_type: BusType, what: str) -> MessageBus:
    try:
        return await asyncio.wait_for(MessageBus(bus_type=bus_type).connect(), DBUS_CALL_TIMEOUT)
    # DBusError: the bus refused our Hello; ValueError: no address for it.
    except (OSError, TimeoutError, DBusError, ValueError) as e:
        detail = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
        raise AgentError(f"cannot connect to the {what} bus: {detail}") from e


async def claim_session_name(session: MessageBus) -> bool:
    """One agent per session: False when another one holds the name."""
    reply = await bus.bus_daemon(session, DBUS_CALL_TIMEOUT).call(
        "RequestName", "su", [NOTIFY_AGENT_BUS_NAME, REQUEST_NAME_DO_NOT_QUEUE]
    )
    return bool(reply.body[0] in (REQUEST_NAME_PRIMARY_OWNER, REQUEST_NAME_ALREADY_OWNER))


async def run() -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    session = await connect(BusType.SESSION, "session")
    try:
        system = await connect(BusType.SYSTEM, "system")
    except AgentError:
        session.disconnect()
        raise
    try:
        if not await claim_session_name(session):
            log.info("another cryptlockd-notify runs in this session; exiting")
            return 0
        notifier = Notifier(session)
        delivery = await notifier.start()
        await DaemonWatch(system, notifier).start()
        buses = {
            asyncio.ensure_future(system.wait_for_disconnect()): "system",  # type: ignore[no-untyped-call]
            asyncio.ensure_future(session.wait_for_disconnect()): "session",  # type: ignore[no-untyped-call]
        }
        stopped = asyncio.ensure_future(stop.wait())
        done, pending = await asyncio.wait(
            {*buses, stopped, delivery}, return_when=asyncio.FIRST_COMPLETED
        )
        for fut in pending:
            fut.cancel()
        if delivery in done:
            delivery.result()  # it only ends by raising
        lost = [name for fut, name in buses.items() if fut in done]
        if lost and stopped not in done:
            raise AgentError(f"lost the connection to the {lost[0]} bus")
        return 0
    except RemoteError as e:
        raise AgentError(str(e)) from e
    finally:
        system.disconnect()
        session.disconnect()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Show cryptlockd's sleep results and warnings as desktop notifications.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="log more")
    args = parser.parse_args(argv)  # a usage error exits 2 here
    logging.basicConfig(
        level=logging.DEBUG if args.debug else logging.INFO,
        format="%(levelname)s: %(message)s",
        stream=sys.stderr,
    )
    try:
        return asyncio.run(run())
    except AgentError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
