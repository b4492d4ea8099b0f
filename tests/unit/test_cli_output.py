"""cryptlockctl's output: values off the bus made plain, and their text forms."""

from __future__ import annotations

import io
import json

from dbus_fast import Variant

from cryptlockd.cli.output import (
    Output,
    describe_cycle,
    device_dict,
    format_check,
    format_devices,
    format_status,
    plain,
    status_dict,
)

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
    lock = {"result": "success", "action": "lock", "devices": ["root"]}
    assert describe_cycle(lock) == "lock: success [root]"


def test_devices_and_check_text() -> None:
    assert format_devices([]) == "No active LUKS devices."
    # Empty fields show as "-", so the columns still split on whitespace.
    bare = device_dict(["data", "2222", "LUKS1", "", False, True, "keyfile:/k", []])
    header, *rows = format_devices([device_dict(DEVICE), bare]).splitlines()
    assert header.split() == [
        "NAME",
        "TYPE",
        "BACKING",
        "ROOT",
        "SUSPENDED",
        "KEY",
        "HOLDERS",
        "UUID",
    ]
    assert [r.split() for r in rows] == [
        ["cryptroot", "LUKS2", "/dev/vda2", "yes", "no", "passphrase", "vg-root", "1111"],
        ["data", "LUKS1", "-", "no", "yes", "keyfile:/k", "-", "2222"],
    ]
    text = format_check([("a", True, "fine"), ("bbb", False, "broken")])
    assert text.splitlines() == ["ok    a    fine", "FAIL  bbb  broken", "1 of 2 checks failed."]


def test_output_is_text_or_one_json_line() -> None:
    for as_json, expected in ((False, "human\n"), (True, '{"a": 1, "b": [2]}\n')):
        stream = io.StringIO()
        Output(as_json, stream).emit("human", {"b": [2], "a": 1})
        assert stream.getvalue() == expected
        if as_json:
            assert json.loads(stream.getvalue()) == {"a": 1, "b": [2]}
