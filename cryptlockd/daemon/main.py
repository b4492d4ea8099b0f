"""The long-running daemon: org.cryptlockd1 on the system bus.

It owns one bus connection, exports the Manager object, holds logind's delay inhibitor
and arms the sleep-cycle helper on a genuine PrepareForSleep(true).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from dbus_fast import BusType, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.constants import NameFlag

from cryptlockd import __version__
from cryptlockd.bus import bus_daemon
from cryptlockd.daemon import polkit
from cryptlockd.daemon.armer import Armer
from cryptlockd.daemon.devices import SystemPaths
from cryptlockd.daemon.helper_armer import HelperArmer
from cryptlockd.daemon.keyslot_memory import KeyslotMemory, state_directory
from cryptlockd.daemon.log import MessageId, event, setup_logging
from cryptlockd.daemon.manager import Manager
from cryptlockd.daemon.notify import Notifier
from cryptlockd.daemon.service import Service
from cryptlockd.daemon.sleep_cycle import SLEEP_DEADLINE
from cryptlockd.defs import BUS_NAME, DBUS_CALL_TIMEOUT
from cryptlockd.errors import CryptlockdError, RemoteError

__all__ = ["main", "manager_for", "parse_args", "serve"]

log = logging.getLogger("cryptlockd")

# READY=1 waits for the helper's RAM filesystem and idle helper (seconds in a slow guest),
# so that `systemctl start` and boot ordering mean "the next sleep is protected". Bounded
# well under the unit's TimeoutStartSec=90s: past it we say READY, and Problems says why.
READY_TIMEOUT = 45.0


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cryptlockd", description=__doc__)
    p.add_argument("--root", default="/", help="prefix for the config and unit paths")
    p.add_argument("--sysfs", default="/sys")
    p.add_argument("--mountinfo", default="/proc/self/mountinfo")
    p.add_argument("--crypttab", default=None, help="default: <root>/etc/crypttab")
    p.add_argument("--dev", default="/dev")
    p.add_argument("--cgroup-root", default=None, help="default: <sysfs>/fs/cgroup")
    p.add_argument("--no-udev", action="store_true", help="no hotplug monitor")
    p.add_argument("--log-target", choices=("auto", "journal", "stderr"), default="auto")
    p.add_argument("--polkit-timeout", type=float, default=polkit.DEFAULT_TIMEOUT)
    p.add_argument(
        "--ready-timeout",
        type=float,
        default=READY_TIMEOUT,
        help="seconds to wait at start for the helper before telling systemd READY=1 "
        "(default: %(default)s)",
    )
    p.add_argument(
        "--sleep-deadline",
        type=float,
        default=SLEEP_DEADLINE,
        help="seconds after PrepareForSleep(true) at which a sleep that has not ended is "
        "taken as over (default: %(default)s)",
    )
    p.add_argument("--debug", action="store_true")
    p.add_argument("--version", action="version", version=__version__)
    return p.parse_args(argv)


def manager_for(
    args: argparse.Namespace, bus: MessageBus, armer: Armer, notifier: Notifier
) -> Manager:
    root = Path(args.root)
    paths = SystemPaths(
        sysfs=Path(args.sysfs),
        mountinfo=Path(args.mountinfo),
        crypttab=Path(args.crypttab) if args.crypttab else root / "etc" / "crypttab",
        dev=Path(args.dev),
    )
    cgroup_root = Path(args.cgroup_root) if args.cgroup_root else paths.sysfs / "fs" / "cgroup"
    return Manager(
        bus,
        armer,
        notifier,
        root=root,
        paths=paths,
        cgroup_root=cgroup_root,
        sleep_deadline=args.sleep_deadline,
    )


async def serve(args: argparse.Namespace, notifier: Notifier, armer: Armer | None = None) -> int:
    # dbus-fast honours DBUS_SYSTEM_BUS_ADDRESS for the system bus.
    bus = await asyncio.wait_for(
        MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect(), DBUS_CALL_TIMEOUT
    )
    manager = manager_for(
        args, bus, armer or HelperArmer(bus, keyslots=KeyslotMemory(state_directory())), notifier
    )
    service = Service(bus, manager, args.polkit_timeout)
    service.start()
    await manager.start()
    service.write_metrics()

    monitor = None
    if not args.no_udev:
        try:
            from cryptlockd.daemon.udev_monitor import DeviceMonitor

            monitor = DeviceMonitor(manager.load_devices)
            monitor.start(asyncio.get_running_loop())
        except Exception as e:
            log.error("no hotplug monitor (devices are read at start and Reload): %s", e)
            monitor = None

    dbus = bus_daemon(bus, DBUS_CALL_TIMEOUT)
    try:
        answer = await dbus.call("RequestName", "su", [BUS_NAME, int(NameFlag.DO_NOT_QUEUE)])
        reply = RequestNameReply(answer.body[0])
    except (RemoteError, ValueError) as e:
        # AccessDenied: the bus policy lets only root own the name.
        log.error("cannot own %s: %s", BUS_NAME, e)
        return 1
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        log.error("cannot own %s (%s): another instance runs?", BUS_NAME, reply.name)
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    disconnected = loop.create_task(_wait_for_disconnect(bus))
    disconnected.add_done_callback(lambda _t: stop.set())

    notifier.start_watchdog()
    notifier.status("Starting: preparing the sleep-cycle helper")
    ready = loop.create_task(manager.wait_ready(args.ready_timeout))
    stopping = loop.create_task(stop.wait())
    await asyncio.wait({ready, stopping}, return_when=asyncio.FIRST_COMPLETED)
    if not stop.is_set():
        armer_name = type(manager.armer).__name__
        log.info(
            "cryptlockd %s running (armer: %s)",
            __version__,
            armer_name,
            extra=event(MessageId.STARTED, ARMER=armer_name),
        )
        notifier.ready(manager.ready_status())
        settle_heap()
    await stopping
    ready.cancel()

    log.info("stopping", extra=event(MessageId.STOPPING))
    notifier.stopping()
    notifier.stop_watchdog()
    if monitor is not None:
        monitor.stop()
    service.stop()
    manager.stop()
    if not disconnected.done():
        with contextlib.suppress(RemoteError):
            await dbus.call("ReleaseName", "s", [BUS_NAME])
        bus.disconnect()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_wait_for_disconnect(bus), DBUS_CALL_TIMEOUT)
        return 0
    log.error("lost the bus connection")
    return 1


def settle_heap() -> None:
    """Once started: what start-up left is moved out of the cycle collector's way. A full
    collection of it took 55-60 ms under TCG, at whatever moment the allocations tipped
    it, a PrepareForSleep or an arm among them (issue 12). Acyclic objects are still freed
    by their reference counts; only cycles among these would stay."""
    gc.collect()
    gc.freeze()


async def _wait_for_disconnect(bus: MessageBus) -> None:
    await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


def main(argv: Sequence[str] | None = None, armer: Armer | None = None) -> int:
    """The daemon. `armer`: what runs the sleep cycle (default: the helper, through
    systemd); the integration tests pass one that only records."""
    args = parse_args(argv)
    # Before anything else: no child may inherit NOTIFY_SOCKET.
    notifier = Notifier.from_environment()
    setup_logging(args.log_target, args.debug)
    try:
        return asyncio.run(serve(args, notifier, armer))
    except CryptlockdError as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
