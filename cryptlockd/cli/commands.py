"""cryptlockctl's commands, one function each: ask the client, hand the answer to the
output. Each returns the exit status; a failure it cannot report that way is a CtlError."""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

from dbus_fast import Message

from cryptlockd.cli.client import Client, CtlError
from cryptlockd.cli.output import (
    Output,
    describe_cycle,
    device_dict,
    format_changes,
    format_check,
    format_devices,
    format_status,
    status_dict,
)
from cryptlockd.cli.signals import CycleFinished, OwnerChanged, PropertiesChanged, daemon_signal
from cryptlockd.defs import (
    STATUS_SCHEMA_VERSION,
)

__all__ = ["COMMANDS", "Command", "SignalPrinter"]


async def cmd_status(client: Client, args: argparse.Namespace, out: Output) -> int:
    status = {"SchemaVersion": STATUS_SCHEMA_VERSION, **status_dict(await client.properties())}
    out.emit(format_status(status), status)
    return 0


async def cmd_devices(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.names:
        devices = [device_dict(await client.get_device(n)) for n in args.names]
    else:
        props = await client.properties()
        devices = [device_dict(d) for d in props.get("Devices", [])]
    out.emit(format_devices(devices), devices)
    return 0


async def cmd_check(client: Client, args: argparse.Namespace, out: Output) -> int:
    results = await client.check()
    out.emit(format_check(results), [{"name": n, "ok": ok, "detail": d} for n, ok, d in results])
    return 0 if all(ok for _, ok, _ in results) else 1


async def cmd_suspend(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.privileged("Suspend")
    return 0


async def cmd_lock(client: Client, args: argparse.Namespace, out: Output) -> int:
    # Returns once the helper runs the cycle; this process is frozen with everything else
    # until the passphrase has brought the disks back.
    await client.privileged("Lock")
    return 0


async def cmd_enable(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.privileged("SetEnabled", True)
    return 0


async def cmd_disable(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.privileged("SetEnabled", False)
    return 0


async def cmd_reload(client: Client, args: argparse.Namespace, out: Output) -> int:
    await client.privileged("Reload")
    return 0


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")


class SignalPrinter:
    """Turns the daemon's signals into output lines, for `monitor`.

    Only signals from the current owner of org.cryptlockd1 count (cli/signals.py).
    """

    def __init__(self, out: Output, owner: str) -> None:
        self.out = out
        self.owner = owner

    def handle(self, msg: Message) -> None:
        signal = daemon_signal(msg, self.owner)
        if signal is None:
            return
        stamp = _now()
        match signal:
            case OwnerChanged(owner):
                self.owner = owner
                running = bool(owner)
                self.out.emit(
                    f"{stamp} cryptlockd {'appeared on' if running else 'left'} the bus",
                    {"time": stamp, "event": "NameOwnerChanged", "running": running},
                )
            case PropertiesChanged(changed, invalidated):
                changed = status_dict(changed)
                human = f"{stamp} changed: {format_changes(changed)}"
                if invalidated:
                    human += f" (invalidated: {', '.join(invalidated)})"
                self.out.emit(
                    human,
                    {
                        "time": stamp,
                        "event": "PropertiesChanged",
                        "changed": changed,
                        "invalidated": invalidated,
                    },
                )
            case CycleFinished(success, record):
                self.out.emit(
                    f"{stamp} cycle finished: {describe_cycle(record)}",
                    {"time": stamp, "event": "CycleFinished", "success": success, "record": record},
                )


async def cmd_monitor(client: Client, args: argparse.Namespace, out: Output) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)

    printer = SignalPrinter(out, await client.subscribe())
    client.on_message(printer.handle)
    # Subscribed first, then the snapshot: nothing that happens after this line is missed.
    status = status_dict(await client.properties())
    stamp = _now()
    out.emit(
        f"{stamp} status: {format_changes(status)}",
        {"time": stamp, "event": "status", "properties": status},
    )
    disconnected = asyncio.ensure_future(client.wait_for_disconnect())
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for fut in (disconnected, stopped):
        if fut not in done:
            fut.cancel()
    if disconnected in done:
        raise CtlError("lost the connection to the system bus")
    return 0


Command = Callable[[Client, argparse.Namespace, Output], Awaitable[int]]

# Each command with its one line of help; main.py builds the parser from this table.
COMMANDS: dict[str, tuple[Command, str]] = {
    "status": (cmd_status, "show whether the next suspend is protected, and why not"),
    "devices": (cmd_devices, "list the active LUKS devices (or the ones named)"),
    "check": (cmd_check, "run the self-checks; exit status 1 if any fails"),
    "suspend": (cmd_suspend, "suspend now, wiping the disk keys"),
    "lock": (cmd_lock, "lock the disks without suspending: wipe the keys, ask at the VT"),
    "enable": (cmd_enable, "turn protection on"),
    "disable": (cmd_disable, "turn protection off (suspend still works, unprotected)"),
    "reload": (cmd_reload, "re-read the configuration"),
    "monitor": (cmd_monitor, "print property changes and finished cycles until interrupted"),
}
