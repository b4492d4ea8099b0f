from __future__ import annotations

import struct

import pytest

from cryptlockd.helper import verify
from cryptlockd.helper.record import CycleRecord

UUID = "0b7c3a58-5f7e-4c2d-9a51-2f8a0d6e1c33"


def test_luks_uuid_from_dm_uuid() -> None:
    dm = "CRYPT-LUKS2-" + UUID.replace("-", "") + "-root"
    assert verify.luks_uuid_from_dm_uuid(dm) == UUID
    assert verify.luks_uuid_from_dm_uuid("CRYPT-LUKS1-" + "A" * 32 + "-x") == (
        "aaaaaaaa-aaaa-aaaa-aaaa-aaaaaaaaaaaa"
    )
    for bad in (
        "",
        "CRYPT-PLAIN-root",
        "LVM-abc",
        "CRYPT-LUKS2-xyz-root",
        "CRYPT-LUKS2-" + "g" * 32 + "-root",
    ):
        assert verify.luks_uuid_from_dm_uuid(bad) is None


@pytest.mark.parametrize(
    ("table", "ring", "protected"),
    [
        ("zeroed", "none", True),
        ("zeroed", "invalidated: 0000002a", True),
        ("zeroed", "none (kernel without keyrings)", True),
        ("present", "none", False),
        ("unknown", "none", False),
        ("zeroed", "left: 0000002a logon cryptsetup:x-d0 (Permission denied)", False),
        ("zeroed", "error: cannot read /proc/keys: Permission denied", False),
        ("zeroed", "", False),
    ],
)
def test_is_protected(table: str, ring: str, protected: bool) -> None:
    assert verify.is_protected({"dm_table_key": table, "keyring": ring}) is protected


def test_record_fails_and_names_an_unprotected_device() -> None:
    rec = CycleRecord(["root", "data"])
    rec.suspended = ["root", "data"]
    rec.resumed = ["data", "root"]
    rec.slept = True
    rec.verification["root"] = {"dm_table_key": "zeroed", "keyring": "none", "protected": "yes"}
    rec.verification["data"] = {
        "dm_table_key": "zeroed",
        "keyring": "left: 1 (EACCES)",
        "protected": "no",
    }
    rec.finish()
    assert not rec.success
    assert rec.unverified() == ["data"]
    assert "could not be verified" in rec.reason
    assert any(p.startswith("data was NOT protected") and "left: 1" in p for p in rec.problems)


def test_record_succeeds_when_every_device_is_proven_wiped() -> None:
    rec = CycleRecord(["root"])
    rec.suspended, rec.resumed, rec.slept = ["root"], ["root"], True
    rec.verification["root"] = {
        "dm_table_key": "zeroed",
        "keyring": "invalidated: 1",
        "protected": "yes",
    }
    rec.finish()
    assert rec.success and rec.problems == []


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
