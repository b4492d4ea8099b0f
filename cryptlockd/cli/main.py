"""cryptlockctl: the command-line client. It only talks D-Bus to cryptlockd.

Exit status: 0 success, 1 a failed check or operation (or no daemon), 2 a usage error.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TextIO, TypeVar

from dbus_fast import BusType, DBusError, Message, MessageFlag, MessageType, Variant
from dbus_fast.aio import MessageBus, ProxyInterface
from dbus_fast.introspection import Node

from cryptlockd import __version__
from cryptlockd.defs import (
    BUS_NAME,
    DEVICE_FIELDS,
    INTROSPECTION_XML,
    MANAGER_INTERFACE,
    OBJECT_PATH,
)

__all__ = ["main"]

T = TypeVar("T")

PROG = "cryptlockctl"
# Reads answer at once; privileged calls wait for polkit (which may ask for a password)
# and, for Suspend, for logind.
READ_TIMEOUT = 10.0
PRIVILEGED_TIMEOUT = 60.0

DBUS_INTERFACE = "org.freedesktop.DBus"
PROPERTIES_INTERFACE = "org.freedesktop.DBus.Properties"
NOT_RUNNING_ERRORS = (
    "org.freedesktop.DBus.Error.ServiceUnknown",
    "org.freedesktop.DBus.Error.NameHasNoOwner",
)
NOT_RUNNING = f"cryptlockd is not running ({BUS_NAME} has no owner on the system bus)"


class CtlError(Exception):
    """One readable line for stderr; exit status 1."""


# ---- values off the bus -------------------------------------------------------------


def plain(value: Any) -> Any:
    """Variants, structs and arrays off the bus as JSON-ready Python values."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return value


def device_dict(struct: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(DEVICE_FIELDS, plain(struct), strict=True))


def status_dict(props: dict[str, Any]) -> dict[str, Any]:
    out = {k: plain(v) for k, v in sorted(props.items())}
    if "Devices" in out:
        out["Devices"] = [device_dict(d) for d in props["Devices"]]
    return out


# ---- the connection -----------------------------------------------------------------


class Client:
    """The one owner of the bus connection; every call has a deadline and every D-Bus error
    becomes a CtlError here and nowhere else."""

    def __init__(self, bus: MessageBus, timeout: float | None) -> None:
        self.bus = bus
        self.timeout = timeout
        node = Node.parse(INTROSPECTION_XML.read_text())
        self.xml_properties = {
            p.name: p.signature
            for iface in node.interfaces
            if iface.name == MANAGER_INTERFACE
            for p in iface.properties
        }
        obj = bus.get_proxy_object(BUS_NAME, OBJECT_PATH, node)
        self.manager: ProxyInterface = obj.get_interface(MANAGER_INTERFACE)

    @classmethod
    async def connect(cls, timeout: float | None) -> Client:
        try:
            bus = await asyncio.wait_for(
                MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect(),
                timeout or READ_TIMEOUT,
            )
        except (OSError, TimeoutError, DBusError, ValueError) as e:
            detail = "timed out" if isinstance(e, TimeoutError) else str(e) or type(e).__name__
            raise CtlError(f"cannot connect to the system bus: {detail}") from e
        return cls(bus, timeout)

    def close(self) -> None:
        self.bus.disconnect()

    async def _await(self, what: str, aw: Awaitable[T], privileged: bool = False) -> T:
        timeout = self.timeout or (PRIVILEGED_TIMEOUT if privileged else READ_TIMEOUT)
        try:
            return await asyncio.wait_for(aw, timeout)
        except TimeoutError as e:
            raise CtlError(f"{what}: no answer from cryptlockd within {timeout:g} s") from e
        except DBusError as e:
            if e.type in NOT_RUNNING_ERRORS:
                raise CtlError(NOT_RUNNING) from e
            if e.type.startswith("org.freedesktop.DBus.Error.Spawn."):
                raise CtlError(
                    f"cryptlockd is not running and could not be started: {e.text} ({e.type})"
                ) from e
            text = " ".join(str(e.text).split())  # one line, whatever the daemon sent
            raise CtlError(f"{what} failed: {e.type}: {text}") from e
        except (OSError, EOFError) as e:
            raise CtlError(f"{what}: lost the connection to the system bus: {e}") from e

    async def _raw_call(self, msg: Message) -> list[Any]:
        reply = await self.bus.call(msg)
        if reply is None:
            raise EOFError("no reply")
        if reply.message_type == MessageType.ERROR:
            raise DBusError(
                reply.error_name or "org.freedesktop.DBus.Error.Failed",
                str(reply.body[0]) if reply.body else "",
                reply,
            )
        return list(reply.body)

    async def properties(self) -> dict[str, Any]:
        body = await self._await(
            "GetAll",
            self._raw_call(
                Message(
                    destination=BUS_NAME,
                    path=OBJECT_PATH,
                    interface=PROPERTIES_INTERFACE,
                    member="GetAll",
                    signature="s",
                    body=[MANAGER_INTERFACE],
                )
            ),
        )
        props: dict[str, Variant] = body[0]
        for name, sig in self.xml_properties.items():
            got = props.get(name)
            if got is not None and got.signature != sig:
                raise CtlError(
                    f"cryptlockd sent {name} as '{got.signature}', expected '{sig}' "
                    f"(a cryptlockd of another version?)"
                )
        return {k: v.value for k, v in props.items()}

    async def check(self) -> list[tuple[str, bool, str]]:
        rows = await self._await("Check", self.manager.call_check())  # type: ignore[attr-defined]
        return [(str(n), bool(ok), str(d)) for n, ok, d in rows]

    async def get_device(self, name: str) -> dict[str, Any]:
        struct = await self._await("GetDevice", self.manager.call_get_device(name))  # type: ignore[attr-defined]
        return device_dict(struct)

    async def privileged(self, method: str, *args: Any) -> None:
        fn = getattr(self.manager, f"call_{method_snake(method)}")
        # Lets polkit ask for a password through an agent in the caller's session.
        await self._await(
            method, fn(*args, flags=MessageFlag.ALLOW_INTERACTIVE_AUTHORIZATION), privileged=True
        )

    async def name_owner(self, name: str) -> str:
        body = await self._await(
            "GetNameOwner",
            self._raw_call(
                Message(
                    destination=DBUS_INTERFACE,
                    path="/org/freedesktop/DBus",
                    interface=DBUS_INTERFACE,
                    member="GetNameOwner",
                    signature="s",
                    body=[name],
                )
            ),
        )
        return str(body[0])

    async def add_match(self, rule: str) -> None:
        await self._await(
            "AddMatch",
            self._raw_call(
                Message(
                    destination=DBUS_INTERFACE,
                    path="/org/freedesktop/DBus",
                    interface=DBUS_INTERFACE,
                    member="AddMatch",
                    signature="s",
                    body=[rule],
                )
            ),
        )


def method_snake(name: str) -> str:
    return "".join("_" + c.lower() if c.isupper() else c for c in name).lstrip("_")


# ---- human output -------------------------------------------------------------------


def yes_no(value: Any) -> str:
    return "yes" if value else "no"


def describe_cycle(record: dict[str, Any]) -> str:
    if not record:
        return "none yet"
    result = record.get("result") or ("success" if record.get("success") else "failed")
    parts = [str(result)]
    if record.get("reason"):
        parts.append(f"({record['reason']})")
    devices = record.get("devices")
    if isinstance(devices, list):
        parts.append(f"[{', '.join(map(str, devices)) or 'no devices'}]")
    for key in ("finished", "finished_at", "time"):
        if record.get(key):
            parts.append(f"at {record[key]}")
            break
    return " ".join(parts)


def format_status(status: dict[str, Any]) -> str:
    devices = status.get("Devices", [])
    names = ", ".join(d["name"] for d in devices)
    problems = status.get("Problems", [])
    lines = [
        f"Protected:  {yes_no(status.get('Protected'))}",
        f"Problems:   {'none' if not problems else problems[0]}",
        *(f"            {p}" for p in problems[1:]),
        f"State:      {status.get('State', '?')}",
        f"Enabled:    {yes_no(status.get('Enabled'))}",
        f"Devices:    {len(devices)}" + (f" ({names})" if names else ""),
        f"Last cycle: {describe_cycle(status.get('LastCycle') or {})}",
        f"Version:    {status.get('Version', '?')}",
    ]
    return "\n".join(lines)


def format_devices(devices: list[dict[str, Any]]) -> str:
    if not devices:
        return "No active LUKS devices."
    header = ("NAME", "TYPE", "BACKING", "ROOT", "SUSPENDED", "KEY", "HOLDERS", "UUID")
    rows = [header] + [
        (
            d["name"],
            d["luks_type"],
            d["backing_device"] or "-",
            yes_no(d["holds_root"]),
            yes_no(d["suspended"]),
            d["key_source"],
            ",".join(d["holders"]) or "-",
            d["uuid"],
        )
        for d in devices
    ]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def format_check(results: list[tuple[str, bool, str]]) -> str:
    width = max((len(n) for n, _, _ in results), default=0)
    lines = [f"{'ok  ' if ok else 'FAIL'}  {n.ljust(width)}  {d}".rstrip() for n, ok, d in results]
    failed = sum(1 for _, ok, _ in results if not ok)
    lines.append(
        f"{failed} of {len(results)} checks failed."
        if failed
        else f"All {len(results)} checks passed."
    )
    return "\n".join(lines)


def format_changes(changed: dict[str, Any]) -> str:
    parts = []
    for key, value in sorted(changed.items()):
        if key == "Devices":
            parts.append(f"Devices=[{', '.join(d['name'] for d in value)}]")
        elif key == "LastCycle":
            parts.append(f"LastCycle=({describe_cycle(value)})")
        elif isinstance(value, bool):
            parts.append(f"{key}={yes_no(value)}")
        elif isinstance(value, list):
            parts.append(f"{key}=[{'; '.join(map(str, value))}]")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)


# ---- commands -----------------------------------------------------------------------


class Output:
    def __init__(self, as_json: bool, stream: TextIO) -> None:
        self.json = as_json
        self.stream = stream

    def emit(self, human: str, data: Any) -> None:
        if self.json:
            self.stream.write(json.dumps(data, sort_keys=True) + "\n")
        else:
            self.stream.write(human + "\n")
        self.stream.flush()


async def cmd_status(client: Client, args: argparse.Namespace, out: Output) -> int:
    status = status_dict(await client.properties())
    out.emit(format_status(status), status)
    return 0


async def cmd_devices(client: Client, args: argparse.Namespace, out: Output) -> int:
    if args.names:
        devices = [await client.get_device(n) for n in args.names]
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
            and msg.sender == DBUS_INTERFACE
            and msg.interface == DBUS_INTERFACE
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

    await client.add_match(
        f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
        f"interface='{PROPERTIES_INTERFACE}',member='PropertiesChanged',"
        f"arg0='{MANAGER_INTERFACE}'"
    )
    await client.add_match(
        f"type='signal',sender='{BUS_NAME}',path='{OBJECT_PATH}',"
        f"interface='{MANAGER_INTERFACE}',member='CycleFinished'"
    )
    await client.add_match(
        f"type='signal',sender='{DBUS_INTERFACE}',interface='{DBUS_INTERFACE}'"
        f",member='NameOwnerChanged',arg0='{BUS_NAME}'"
    )
    printer = SignalPrinter(out, await client.name_owner(BUS_NAME))
    client.bus.add_message_handler(printer.handle)
    # Subscribed first, then the snapshot: nothing that happens after this line is missed.
    status = status_dict(await client.properties())
    stamp = _now()
    out.emit(
        f"{stamp} status: {format_changes(status)}",
        {"time": stamp, "event": "status", "properties": status},
    )
    disconnected = asyncio.ensure_future(client.bus.wait_for_disconnect())  # type: ignore[no-untyped-call]
    stopped = asyncio.ensure_future(stop.wait())
    done, _ = await asyncio.wait({disconnected, stopped}, return_when=asyncio.FIRST_COMPLETED)
    for fut in (disconnected, stopped):
        if fut not in done:
            fut.cancel()
    if disconnected in done:
        raise CtlError("lost the connection to the system bus")
    return 0


Command = Callable[[Client, argparse.Namespace, Output], Awaitable[int]]

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


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be above 0: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--json",
        action="store_true",
        default=argparse.SUPPRESS,
        help="machine-readable output (JSON; JSON lines for monitor)",
    )
    common.add_argument(
        "--timeout",
        type=positive_float,
        default=argparse.SUPPRESS,
        metavar="SEC",
        help="give up on a D-Bus call after SEC seconds",
    )
    parser = argparse.ArgumentParser(
        prog=PROG,
        parents=[common],
        description="Query and control cryptlockd, which wipes LUKS keys from RAM across suspend.",
    )
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (_, help_text) in COMMANDS.items():
        p = sub.add_parser(name, parents=[common], help=help_text, description=help_text)
        if name == "devices":
            p.add_argument("names", nargs="*", metavar="NAME", help="dm name")
    return parser


async def run(args: argparse.Namespace) -> int:
    command, _ = COMMANDS[args.command]
    out = Output(getattr(args, "json", False), sys.stdout)
    client = await Client.connect(getattr(args, "timeout", None))
    try:
        return await command(client, args, out)
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return asyncio.run(run(args))
    except CtlError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        # `cryptlockctl monitor | head`: the reader left, which is not an error of ours.
        with contextlib.suppress(OSError):
            sys.stdout.close()
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
