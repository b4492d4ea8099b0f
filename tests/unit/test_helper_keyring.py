from __future__ import annotations

import errno

from cryptlockd.helper import keyring
from cryptlockd.helper.keyring import KeyringOps, ProcKey

UUID = "0b7c3a58-5f7e-4c2d-9a51-2f8a0d6e1c33"
OTHER = "ffffffff-5f7e-4c2d-9a51-2f8a0d6e1c33"
PROC_KEYS = f"""\
1b2c3d4e I--Q---     1 perm 3f010000     0     0 logon     cryptsetup:{UUID}-d0: 64
0a0b0c0d I--Q---     2 perm 3f030000     0     0 keyring   _ses: 1
11111111 I--Q---     1 perm 3f010000     0     0 logon     cryptsetup:{UUID}-d1: 64
22222222 I--Q---     1 perm 3f010000     0     0 logon     cryptsetup:{UUID}-dx: 64
33333333 I--Q---     1 perm 3f010000     0     0 logon     cryptsetup:{OTHER}-d0: 64
44444444 I--Q---     1 perm 3f010000     0     0 big_key   cryptsetup:{UUID}-d0: 64
55555555 I-----i     1 perm 3f010000     0     0 user      cryptsetup:{UUID}-d2: 64
garbage
"""


def test_parse_proc_keys() -> None:
    keys = keyring.parse_proc_keys(PROC_KEYS)
    assert len(keys) == 7
    assert keys[0].serial == 0x1B2C3D4E
    assert keys[0].type == "logon"
    assert keys[0].description == f"cryptsetup:{UUID}-d0"
    assert keys[1].description == "_ses"
    assert not keys[0].invalidated and keys[6].invalidated


def test_volume_keys_match_uuid_segment_and_type() -> None:
    found = keyring.volume_keys(keyring.parse_proc_keys(PROC_KEYS), UUID)
    assert [k.serial for k in found] == [0x1B2C3D4E, 0x11111111, 0x55555555]
    assert keyring.volume_keys(keyring.parse_proc_keys(PROC_KEYS), UUID.upper())


class FakeKeys(KeyringOps):
    def __init__(
        self,
        keys: list[ProcKey],
        *,
        deny_unpossessed: bool = False,
        possession_works: bool = True,
        gc: bool = True,
    ) -> None:
        self.keys = {k.serial: k for k in keys}
        self.deny_unpossessed = deny_unpossessed
        self.possession_works = possession_works
        self.possessed = False
        self.gc = gc
        self.invalidated: list[int] = []
        self.now = 0.0

    def read(self) -> list[ProcKey]:
        return list(self.keys.values())

    def invalidate(self, serial: int) -> None:
        if self.deny_unpossessed and not self.possessed:
            raise OSError(errno.EACCES, "Permission denied")
        self.invalidated.append(serial)
        if self.gc:
            del self.keys[serial]
        else:
            self.keys[serial].flags = "I-----i"

    def gain_possession(self) -> list[str]:
        self.possessed = self.possession_works
        return [] if self.possession_works else ["user keyring: Permission denied"]

    def pause(self) -> None:
        self.now += 0.05

    def clock(self) -> float:
        return self.now


def key(serial: int, desc: str = f"cryptsetup:{UUID}-d0", type: str = "logon") -> ProcKey:
    return ProcKey(serial, "I--Q---", type, desc)


def test_sweep_nothing_found() -> None:
    ops = FakeKeys([key(1, "cryptsetup:other-d0")])
    assert keyring.sweep(UUID, ops) == "none"
    assert ops.invalidated == []


def test_sweep_invalidates_and_rechecks() -> None:
    ops = FakeKeys([key(0xABC), key(0xDEF, f"cryptsetup:{UUID}-d1")])
    assert keyring.sweep(UUID, ops) == "invalidated: 00000abc 00000def"
    assert ops.invalidated == [0xABC, 0xDEF]


def test_sweep_gains_possession_on_eacces() -> None:
    ops = FakeKeys([key(7)], deny_unpossessed=True)
    assert keyring.sweep(UUID, ops) == "invalidated: 00000007"
    assert ops.possessed


def test_sweep_reports_a_key_it_cannot_remove() -> None:
    ops = FakeKeys([key(7)], deny_unpossessed=True, possession_works=False)
    result = keyring.sweep(UUID, ops)
    assert result.startswith("left: 00000007 logon cryptsetup:")
    assert "Permission denied" in result and "user keyring" in result


def test_sweep_waits_for_gc_then_gives_up_loudly() -> None:
    ops = FakeKeys([key(7)], gc=False)
    result = keyring.sweep(UUID, ops, gc_deadline=0.2)
    assert result.startswith("left: ") and "not yet collected" in result
    assert ops.now >= 0.2


def test_sweep_without_proc_keys() -> None:
    class NoKeys(FakeKeys):
        def read(self) -> list[ProcKey]:
            raise FileNotFoundError(errno.ENOENT, "No such file")

    class Unreadable(FakeKeys):
        def read(self) -> list[ProcKey]:
            raise PermissionError(errno.EACCES, "Permission denied")

    assert keyring.sweep(UUID, NoKeys([])).startswith("none")
    assert keyring.sweep(UUID, Unreadable([])).startswith("error: ")
