"""cryptlockctl's commands: the monitor's signal filter (a genuine CycleFinished is
printed, one from another sender is not)."""

from __future__ import annotations

import io
import json
from typing import Any

from dbus_fast import Message, MessageType, Variant

from cryptlockd.cli.commands import SignalPrinter
from cryptlockd.cli.output import Output
from cryptlockd.defs import BUS_NAME, DBUS_NAME, DBUS_PATH, MANAGER_INTERFACE, OBJECT_PATH


def signal(sender: str, path: str, interface: str, member: str, sig: str, *body: Any) -> Message:
    msg = Message(
        message_type=MessageType.SIGNAL,
        path=path,
        interface=interface,
        member=member,
        signature=sig,
        body=list(body),
    )
    msg.sender = sender
    return msg


def cycle_signal(sender: str) -> Message:
    record = {"result": Variant("s", "success"), "devices": Variant("as", ["cryptroot"])}
    return signal(sender, OBJECT_PATH, MANAGER_INTERFACE, "CycleFinished", "ba{sv}", True, record)


def test_monitor_prints_only_the_owners_signals() -> None:
    stream = io.StringIO()
    printer = SignalPrinter(Output(True, stream), owner=":1.7")
    printer.handle(cycle_signal(":1.99"))  # forged
    assert stream.getvalue() == ""
    printer.handle(cycle_signal(":1.7"))
    event = json.loads(stream.getvalue())
    assert event["event"] == "CycleFinished" and event["success"] is True
    assert event["record"] == {"result": "success", "devices": ["cryptroot"]}

    # The daemon restarts: the new owner's signals count, the old one's no longer.
    gone = signal(
        DBUS_NAME, DBUS_PATH, DBUS_NAME, "NameOwnerChanged", "sss", BUS_NAME, ":1.7", ":1.8"
    )
    printer.handle(gone)
    stream.truncate(0)
    stream.seek(0)
    printer.handle(cycle_signal(":1.7"))
    assert stream.getvalue() == ""
    printer.handle(cycle_signal(":1.8"))
    assert json.loads(stream.getvalue())["event"] == "CycleFinished"


def test_monitor_human_cycle_line() -> None:
    stream = io.StringIO()
    SignalPrinter(Output(False, stream), owner=":1.7").handle(cycle_signal(":1.7"))
    assert stream.getvalue().endswith(" cycle finished: success [cryptroot]\n")
