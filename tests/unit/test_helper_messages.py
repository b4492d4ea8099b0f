"""What the daemon puts in the arm message and how it reads the record back
(cryptlockd/daemon/helper_messages.py)."""

from __future__ import annotations

from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.daemon.helper_messages import device_plan, merge_record


def test_device_plan_root_takes_passphrase() -> None:
    devs = [
        LuksDevice("root", "u1", "LUKS2", "/dev/vda", True, False, "keyfile:/etc/keys/root.key"),
        LuksDevice("data", "u2", "LUKS2", "/dev/vdb", False, False, "keyfile:/etc/keys/d.key"),
    ]
    plan = {d["name"]: d["key_source"] for d in device_plan(devs)}
    assert plan == {"root": "passphrase", "data": "keyfile:/etc/keys/d.key"}


def test_device_plan_carries_keyfile_size_and_offset() -> None:
    devs = [
        LuksDevice(
            "root",
            "u1",
            "LUKS2",
            "/dev/vda",
            True,
            False,
            "keyfile:/r.key",
            keyfile_size=32,
            keyfile_offset=8,
        ),
        LuksDevice(
            "data",
            "u2",
            "LUKS2",
            "/dev/vdb",
            False,
            False,
            "keyfile:/d.key",
            keyfile_size=64,
            keyfile_offset=4096,
        ),
    ]
    plan = {str(d["name"]): (d["keyfile_size"], d["keyfile_offset"]) for d in device_plan(devs)}
    # The root's keyfile is never read (it takes the passphrase), so neither are its options.
    assert plan == {"root": (0, 0), "data": (64, 4096)}


def test_merge_record_puts_daemon_steps_first() -> None:
    rec = {"started_boottime": 100.0, "timeline_ms": {"helper_arm": 0.0, "finished": 900.0}}
    out = merge_record(
        rec, {"arm_requested": 99.5, "armed": 100.2}, {"reserve_kib": 65536, "vt": 8}
    )
    assert list(out["timeline_ms"]) == ["arm_requested", "helper_arm", "armed", "finished"]
    assert out["timeline_ms"]["finished"] == 1400.0 and out["arm_seconds"] == 0.7


def test_device_plan_says_which_devices_are_essential() -> None:
    devs = [
        LuksDevice("root", "u1", "LUKS2", "/dev/vda", True, False, "passphrase", essential=False),
        LuksDevice("data", "u2", "LUKS2", "/dev/vdb", False, False, "keyfile:/d", essential=False),
        LuksDevice("var", "u3", "LUKS2", "/dev/vdc", False, False, "passphrase"),
    ]
    plan = {d["name"]: d["essential"] for d in device_plan(devs)}
    # Root always is, whatever discovery said.
    assert plan == {"root": True, "data": False, "var": True}


def test_device_plan_carries_the_graph_in_suspend_order() -> None:
    devs = [
        LuksDevice("lower", "u1", "LUKS2", "/dev/vda", False, False, "passphrase"),
        # upper needs lower and an excluded device, which is not in the plan.
        LuksDevice(
            "upper", "u2", "LUKS2", "/dev/dm-1", True, False, "passphrase", needs=("gone", "lower")
        ),
        LuksDevice(
            "img",
            "u3",
            "LUKS2",
            "/dev/loop0",
            False,
            False,
            "keyfile:/k",
            needs=(),
            keyfile_usable=False,
            header="/etc/h",
        ),
    ]
    plan = device_plan(devs)
    assert [d["name"] for d in plan] == ["img", "upper", "lower"]
    by = {d["name"]: d for d in plan}
    assert by["upper"]["after"] == ["lower"] and by["lower"]["after"] == []
    assert by["img"]["key_source"] == "passphrase" and by["img"]["header"] == "/etc/h"
