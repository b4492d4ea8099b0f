from __future__ import annotations

import os
import struct
from pathlib import Path

from cryptlockd.daemon import helper_armer
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.helper import power, verify
from cryptlockd.sleep_entry import hook_programs


def test_key_field_state() -> None:
    assert verify.key_field_state("aes-xts-plain64 " + "0" * 128 + " 0 252:0 32768") == "zeroed"
    assert verify.key_field_state("aes-xts-plain64 " + "ab" * 64 + " 0 252:0 32768") == "present"
    assert verify.key_field_state("aes-xts-plain64 :64:logon:cryptsetup:u-d0 0 8:1 0") == "present"
    assert verify.key_field_state("x") == "unknown"


def test_parse_table() -> None:
    params = b"aes-xts-plain64 0000 0 252:0 32768\0"
    spec = struct.pack("=QQiI16s", 0, 2048, 0, 0, b"crypt")
    buf = bytearray(8) + spec + params
    assert verify.parse_table(buf, 8, 1) == [("crypt", params[:-1].decode())]


def test_block_mounts() -> None:
    info = (
        "22 1 253:0 / / rw,relatime - ext4 /dev/mapper/root rw\n"
        "23 22 0:5 / /proc rw - proc proc rw\n"
        "24 22 253:1 / /da\\040ta rw - ext4 /dev/mapper/data rw\n"
        "25 22 0:40 / /mnt/f rw - fuse.sshfs /dev/fake rw\n"
    )
    assert power.block_mounts(info) == ["/", "/da ta"]


def test_hook_programs_mask_and_order(tmp_path: Path) -> None:
    lib, etc = tmp_path / "lib", tmp_path / "etc"
    lib.mkdir()
    etc.mkdir()
    for d, name in ((lib, "b"), (lib, "a"), (etc, "b"), (lib, "noexec")):
        p = d / name
        p.write_text("#!/bin/sh\n")
        if name != "noexec":
            p.chmod(0o755)
    os.symlink("/dev/null", etc / "a")
    assert hook_programs([str(etc), str(lib)]) == [str(etc / "b")]


def test_device_plan_root_takes_passphrase() -> None:
    devs = [
        LuksDevice("root", "u1", "LUKS2", "/dev/vda", True, False, "keyfile:/etc/keys/root.key"),
        LuksDevice("data", "u2", "LUKS2", "/dev/vdb", False, False, "keyfile:/etc/keys/d.key"),
    ]
    plan = {d["name"]: d["key_source"] for d in helper_armer.device_plan(devs)}
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
    plan = {
        str(d["name"]): (d["keyfile_size"], d["keyfile_offset"])
        for d in helper_armer.device_plan(devs)
    }
    # The root's keyfile is never read (it takes the passphrase), so neither are its options.
    assert plan == {"root": (0, 0), "data": (64, 4096)}


def test_merge_record_puts_daemon_steps_first() -> None:
    rec = {"started_boottime": 100.0, "timeline_ms": {"helper_arm": 0.0, "finished": 900.0}}
    out = helper_armer.merge_record(
        rec, {"arm_requested": 99.5, "armed": 100.2}, {"reserve_kib": 65536, "vt": 8}
    )
    assert list(out["timeline_ms"]) == ["arm_requested", "helper_arm", "armed", "finished"]
    assert out["timeline_ms"]["finished"] == 1400.0 and out["arm_seconds"] == 0.7


def test_repair_thaws_and_restores(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    for name in ("system.slice", "user.slice"):
        (cg / name).mkdir(parents=True)
        (cg / name / "cgroup.freeze").write_text("1")
    state = tmp_path / "ramfs" / "state"
    state.mkdir(parents=True)
    (state / "frozen").write_text("/system.slice\n/user.slice\n")
    (state / "sync_on_suspend").write_text("1\n")
    sync = tmp_path / "sync_on_suspend"
    sync.write_text("0")
    done = helper_armer.repair(tmp_path / "ramfs", str(tmp_path / "no.sock"), str(cg), str(sync))
    assert len(done) == 2
    assert (cg / "user.slice/cgroup.freeze").read_text() == "0"
    assert sync.read_text() == "1" and not (state / "frozen").exists()
    assert (
        helper_armer.repair(tmp_path / "ramfs", str(tmp_path / "no.sock"), str(cg), str(sync)) == []
    )


def test_last_keyslot_is_tried_first() -> None:
    from cryptlockd.helper import libcryptsetup

    tried: list[int] = []

    class FakeLib:
        def crypt_resume_by_passphrase(
            self, cd: object, name: bytes, slot: int, addr: int, length: int
        ) -> int:
            tried.append(slot)
            return slot if slot == 3 else -1

    class FakeLibrary:
        lib = FakeLib()
        messages: tuple[str, ...] = ()

    dev = libcryptsetup.Device.__new__(libcryptsetup.Device)
    dev.library = FakeLibrary()  # type: ignore[assignment]
    dev.name, dev._bname, dev.cd, dev.slots = "root", b"root", None, [0, 1, 3]  # type: ignore[assignment]
    dev.last_keyslot = -1
    assert dev.resume_by_passphrase(0, 4) and tried == [0, 1, 3]
    tried.clear()
    assert dev.resume_by_passphrase(0, 4) and tried == [3]
    dev.last_keyslot = 1
    tried.clear()
    assert dev.resume_by_passphrase(0, 4) and tried == [1, 0, 3]
