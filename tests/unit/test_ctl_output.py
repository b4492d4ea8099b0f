"""cryptlockctl's output: values off the bus, human formatting, and the monitor's signal
filter (a genuine CycleFinished is printed, one from another sender is not)."""

from __future__ import annotations

import io
import json
import re
from pathlib import Path

from dbus_fast import Message, MessageType, Variant

from cryptlockd.cli.main import (
    COMMANDS,
    Output,
    SignalPrinter,
    build_parser,
    describe_cycle,
    device_dict,
    format_check,
    format_devices,
    format_status,
    plain,
    status_dict,
)
from cryptlockd.defs import BUS_NAME, MANAGER_INTERFACE, OBJECT_PATH

DEVICE = ["cryptroot", "1111", "LUKS2", "/dev/vda2", True, False, "passphrase", ["vg-root"]]


def test_plain_unwraps_variants_and_structs() -> None:
    value = {
        "a": Variant("as", ["x"]),
        "b": Variant("a{sv}", {"c": Variant("d", 1.5)}),
        "t": ("s", 1),
    }
    assert plain(value) == {"a": ["x"], "b": {"c": 1.5}, "t": ["s", 1]}


def test_device_dict_follows_the_dataclass() -> None:
    assert device_dict(DEVICE) == {
        "name": "cryptroot",
        "uuid": "1111",
        "luks_type": "LUKS2",
        "backing_device": "/dev/vda2",
        "holds_root": True,
        "suspended": False,
        "key_source": "passphrase",
        "holders": ["vg-root"],
    }


def test_status_text() -> None:
    status = status_dict(
        {
            "Protected": False,
            "Problems": ["first problem", "second problem"],
            "State": "idle",
            "Enabled": True,
            "Devices": [DEVICE],
            "Version": "0.1.0",
            "LastCycle": {
                "result": Variant("s", "failed"),
                "reason": Variant("s", "no wipe"),
                "devices": Variant("as", ["cryptroot"]),
            },
        }
    )
    assert format_status(status) == (
        "Protected:  no\n"
        "Problems:   first problem\n"
        "            second problem\n"
        "State:      idle\n"
        "Enabled:    yes\n"
        "Devices:    1 (cryptroot)\n"
        "Last cycle: failed (no wipe) [cryptroot]\n"
        "Version:    0.1.0"
    )
    assert describe_cycle({}) == "none yet"
    assert describe_cycle({"success": True}) == "success"


def test_devices_and_check_text() -> None:
    assert format_devices([]) == "No active LUKS devices."
    table = format_devices([device_dict(DEVICE)]).splitlines()
    assert table[1].split() == [
        "cryptroot",
        "LUKS2",
        "/dev/vda2",
        "yes",
        "no",
        "passphrase",
        "vg-root",
        "1111",
    ]
    text = format_check([("a", True, "fine"), ("bbb", False, "broken")])
    assert text.splitlines() == ["ok    a    fine", "FAIL  bbb  broken", "1 of 2 checks failed."]


def test_json_flag_before_and_after_the_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["--json", "status"]).json is True
    assert parser.parse_args(["status", "--json"]).json is True
    assert not getattr(parser.parse_args(["status"]), "json", False)


def cycle_signal(sender: str) -> Message:
    msg = Message(
        message_type=MessageType.SIGNAL,
        path=OBJECT_PATH,
        interface=MANAGER_INTERFACE,
        member="CycleFinished",
        signature="ba{sv}",
        body=[True, {"result": Variant("s", "success"), "devices": Variant("as", ["cryptroot"])}],
    )
    msg.sender = sender
    return msg


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
    gone = Message(
        message_type=MessageType.SIGNAL,
        path="/org/freedesktop/DBus",
        interface="org.freedesktop.DBus",
        member="NameOwnerChanged",
        signature="sss",
        body=[BUS_NAME, ":1.7", ":1.8"],
    )
    gone.sender = "org.freedesktop.DBus"
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


def test_man_page_covers_every_command_and_option() -> None:
    page = (Path(__file__).resolve().parents[2] / "man" / "cryptlockctl.1").read_text()
    section = page.split(".SH COMMANDS", 1)[1].split(".SH OPTIONS", 1)[0]
    # Each command is the tag of a .TP item: the line right after ".TP".
    tags = " ".join(re.findall(r"^\.TP\n(.*)$", section, re.MULTILINE))
    for name in COMMANDS:
        assert re.search(rf"\b{name}\b", tags), f"{name} has no item in cryptlockctl(1)"
    for action in build_parser()._actions:
        for opt in action.option_strings:
            assert opt in page.replace("\\-", "-"), f"{opt} is not in cryptlockctl(1)"
