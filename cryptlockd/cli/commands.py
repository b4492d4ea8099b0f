"""cryptlockctl's commands, one function each: ask the client, hand the answer to the
output. Each returns the exit status; a failure it cannot report that way is a CtlError."""

from __future__ import annotations

import argparse
import asyncio
import signal
import time
from collections.abc import Awaitable, Callable

from dbus_fast import Message, MessageType

from cryptlockd.cli.client import Client, CtlError
from cryptlockd.cli.output import (
    Output,
    describe_cycle,
    device_dict,
    format_changes,
    format_check,
    format_devices,
    format_status,
    plain,
    status_dict,
)
from cryptlockd.defs import (
    BUS_NAME,
    DBUS_NAME,
    MANAGER_INTERFACE,
    OBJECT_PATH,
    PROPERTIES_INTERFACE,
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

    Only signals from the current owner of org.cryptlockd1 count: match rules keep forged
    broadcasts away, but anyone may send a signal straight to our unique name.
    """

    def __init__(self, out: Output, owner: str) -> None:
        self.out = out
        self.owner = owner

    def handle(self, msg: Message) -> None:
        if msg.message_type != MessageType.SIGNAL:
            return
        stamp = _now()
        if (
            msg.member == "NameOwnerChanged"
            and msg.sender == DBUS_NAME
            and msg.interface == DBUS_NAME
            and msg.body
            and msg.body[0] == BUS_NAME
        ):
            self.owner = str(msg.body[2])
            running = bool(self.owner)
            self.out.emit(
                f"{stamp} cryptlockd {'appeared on' if running else 'left'} the bus",
                {"time": stamp, "event": "NameOwnerChanged", "running": running},
            )
            return
        if not self.owner or msg.sender != self.owner or msg.path != OBJECT_PATH:
            return
        if (
            msg.member == "PropertiesChanged"
            and msg.interface == PROPERTIES_INTERFACE
            and msg.signature == "sa{sv}as"
            and msg.body[0] == MANAGER_INTERFACE
        ):
            changed = status_dict({k: v.value for k, v in msg.body[1].items()})
            invalidated = [str(x) for x in msg.body[2]]
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
        elif (
            msg.member == "CycleFinished"
            and msg.interface == MANAGER_INTERFACE
            and msg.signature == "ba{sv}"
        ):
            success, record = bool(msg.body[0]), plain(msg.body[1])
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
    "enable": (cmd_enable, "turn protection on"),
    "disable": (cmd_disable, "turn protection off (suspend still works, unprotected)"),
    "reload": (cmd_reload, "re-read the configuration"),
    "monitor": (cmd_monitor, "print property changes and finished cycles until interrupted"),
}
