"""The helper's libcryptsetup binding.

Its ctypes mirror of struct crypt_pbkdf_type, against the real libcryptsetup: a LUKS2
header is formatted into a plain file (no device-mapper needed), with an Argon2id keyslot
of known cost, and read back through Device.pbkdf_memory_kib(); the volume key derived
from the keyslot that takes the passphrase. And the keyslot that took the passphrase last
time is tried first."""

from __future__ import annotations

import contextlib
import ctypes
import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptlockd.helper import kdf
from cryptlockd.helper import libcryptsetup as lcs
from cryptlockd.helper.kdf import ChildError

MEMORY_KIB = 8192
ITERATIONS = 4


def _library() -> lcs.Library:
    try:
        return lcs.Library()
    except OSError as e:
        pytest.skip(f"{lcs.SONAME} is not installed on this host ({e})")


def _format(library: lcs.Library, path: Path) -> ctypes.c_void_p:
    lib = library.lib
    cd = ctypes.c_void_p()
    lib.crypt_init.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
    assert lib.crypt_init(ctypes.byref(cd), str(path).encode()) == 0
    pbkdf = lcs._PbkdfType(
        type=b"argon2id",
        hash=b"sha256",
        iterations=ITERATIONS,
        max_memory_kb=MEMORY_KIB,
        parallel_threads=1,
        flags=1 << 1,
    )  # CRYPT_PBKDF_NO_BENCHMARK: take the cost as given
    lib.crypt_set_pbkdf_type.argtypes = [ctypes.c_void_p, ctypes.POINTER(lcs._PbkdfType)]
    assert lib.crypt_set_pbkdf_type(cd, ctypes.byref(pbkdf)) == 0, library.messages
    lib.crypt_format.argtypes = [
        ctypes.c_void_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_void_p,
    ]
    rc = lib.crypt_format(cd, b"LUKS2", b"aes", b"xts-plain64", None, None, 64, None)
    assert rc == 0, library.messages
    lib.crypt_keyslot_add_by_volume_key.argtypes = [
        ctypes.c_void_p,
        ctypes.c_int,
        ctypes.c_char_p,
        ctypes.c_size_t,
        ctypes.c_char_p,
        ctypes.c_size_t,
    ]
    # A throwaway test passphrase for a file that is deleted with the test's tmp_path.
    assert lib.crypt_keyslot_add_by_volume_key(cd, 3, None, 0, b"unit", 4) == 3, library.messages
    return cd


IMAGE = "luks2.img"


@contextlib.contextmanager
def luks2_image(tmp_path: Path, needs: str = "") -> Iterator[tuple[lcs.Library, ctypes.c_void_p]]:
    """A LUKS2 image file (tmp_path / IMAGE) formatted by the real libcryptsetup, and its
    context; the test is skipped where the library lacks `needs`."""
    library = _library()
    if needs and not library.has(needs):
        pytest.skip(f"this libcryptsetup has no {needs}")
    with (tmp_path / IMAGE).open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    cd = _format(library, tmp_path / IMAGE)
    try:
        yield library, cd
    finally:
        library.lib.crypt_free(cd)


def header_device(library: lcs.Library, cd: ctypes.c_void_p) -> lcs.Device:
    """A Device on a context loaded from a header, without an active mapping (the host has
    no device-mapper)."""
    device = lcs.Device.__new__(lcs.Device)
    device.library, device.name, device.cd = library, "unit", cd
    device.slots, device.tried = device.active_keyslots(), []
    device.priorities = device.keyslot_priorities()
    return device


@pytest.mark.skipif(os.geteuid() != 0, reason="libcryptsetup locks under /run/cryptsetup")
def test_keyslot_argon2_memory_is_read_at_the_right_offset(tmp_path: Path) -> None:
    with luks2_image(tmp_path, "crypt_keyslot_get_pbkdf") as (library, cd):
        device = header_device(library, cd)
        assert device.slots == [3]
        # Were a field of the struct missing, this would read the iteration count (4).
        assert device.pbkdf_memory_kib() == MEMORY_KIB


class FakeLib:
    """The calls of a passphrase resume, each KDF run (a keyslot tried) noted."""

    def __init__(self, good_slot: int) -> None:
        self.good_slot = good_slot
        self.tried: list[int] = []
        self.resumed: list[bytes] = []
        self.locked_while_deriving: list[bool] = []

    def crypt_get_volume_key_size(self, cd: object) -> int:
        return 64

    def crypt_volume_key_get(
        self, cd: object, slot: int, key: object, size: object, addr: int, length: int
    ) -> int:
        self.tried.append(slot)
        self.locked_while_deriving.append(lcs.DM_LOCK.locked())
        if slot != self.good_slot:
            return -1
        ctypes.memset(key, 0x5A, 64)  # type: ignore[call-overload]
        return slot

    def crypt_resume_by_volume_key(self, cd: object, name: bytes, key: object, n: int) -> int:
        self.resumed.append(name)
        return 0

    def crypt_resume_by_passphrase(
        self, cd: object, name: bytes, slot: int, addr: int, length: int
    ) -> int:
        self.tried.append(slot)
        return slot if slot == self.good_slot else -1


class FakeLibrary:
    def __init__(self, lib: FakeLib, with_volume_key: bool = True) -> None:
        self.lib = lib
        self.with_volume_key = with_volume_key
        self.messages: list[str] = []

    def has(self, symbol: str) -> bool:
        return self.with_volume_key and symbol == "crypt_resume_by_volume_key"

    def _check(self, call: str, name: str, rc: int) -> int:
        if rc < 0:
            raise lcs.CryptError(call, name, rc, self.messages)
        return rc


def _fake_device(lib: FakeLib, slots: list[int], with_volume_key: bool = True) -> lcs.Device:
    dev = lcs.Device.__new__(lcs.Device)
    dev.library = FakeLibrary(lib, with_volume_key)  # type: ignore[assignment]
    dev.name, dev._bname, dev.cd, dev.slots = "root", b"root", None, slots  # type: ignore[assignment]
    dev.last_keyslot = -1
    dev.tried = []
    dev.priorities = {}
    dev.derives_alone = False
    return dev


@pytest.mark.parametrize("with_volume_key", [True, False])
def test_a_passphrase_in_a_later_keyslot_costs_two_kdfs_then_one(with_volume_key: bool) -> None:
    lib = FakeLib(good_slot=1)
    dev = _fake_device(lib, [0, 1], with_volume_key)
    assert dev.resume_by_passphrase(0, 4) and lib.tried == [0, 1]
    assert dev.last_keyslot == 1  # the daemon gets it in the record, and sends it back
    lib.tried.clear()
    assert dev.resume_by_passphrase(0, 4) and lib.tried == [1]
    # A remembered keyslot that no longer takes it: the others after it, once each.
    lib.good_slot, dev.slots, dev.last_keyslot = 3, [0, 1, 3], 1
    lib.tried.clear()
    assert dev.resume_by_passphrase(0, 4) and lib.tried == [1, 0, 3]
    lib.good_slot = 7
    lib.tried.clear()
    assert not dev.resume_by_passphrase(0, 4) and lib.tried == [3, 0, 1]
    # The record's keyslots_tried: every try of the cycle, in order.
    assert dev.tried == [0, 1, 1, 1, 0, 3, 3, 0, 1]


def test_the_volume_key_path_resumes_by_the_derived_key() -> None:
    lib = FakeLib(good_slot=0)
    dev = _fake_device(lib, [0])
    assert dev.resume_by_passphrase(0, 4) and lib.resumed == [b"root"]
    lib.good_slot, lib.resumed = 5, []
    assert not dev.resume_by_passphrase(0, 4) and lib.resumed == []


def test_a_device_whose_keyslots_the_kernel_cannot_decrypt_derives_under_the_dm_lock() -> None:
    # libcryptsetup would fall back to a temporary dm-crypt mapping (libdevmapper, not
    # thread-safe): that derivation must not run beside another device's resume.
    lib = FakeLib(good_slot=0)
    dev = _fake_device(lib, [0])
    assert dev.resume_by_passphrase(0, 4) and lib.locked_while_deriving == [False]
    dev.derives_alone, lib.locked_while_deriving = True, []
    assert dev.resume_by_passphrase(0, 4) and lib.locked_while_deriving == [True]


@pytest.mark.skipif(os.geteuid() != 0, reason="libcryptsetup locks under /run/cryptsetup")
def test_the_key_is_derived_from_the_keyslot_that_takes_the_passphrase(tmp_path: Path) -> None:
    # The real crypt_volume_key_get through the binding's argtypes: slot 1 holds another
    # passphrase, slot 3 this one.
    with luks2_image(tmp_path, "crypt_resume_by_volume_key") as (library, cd):
        assert library.lib.crypt_keyslot_add_by_volume_key(cd, 1, None, 0, b"other", 5) == 1
        device = header_device(library, cd)
        assert device.slots == [1, 3]
        # The probe reads each keyslot's cipher; whether AF_ALG takes it is this kernel's.
        spec = library.lib.crypt_keyslot_get_encryption(cd, 3, ctypes.byref(ctypes.c_size_t()))
        assert lcs.kernel_skcipher_name(spec.decode()) == "xts(aes)"
        assert device._keyslots_in_kernel() == lcs.kernel_skcipher_usable("xts(aes)")
        device.derives_alone = False
        phrase = ctypes.create_string_buffer(b"unit", 4)
        key = (ctypes.c_char * library.lib.crypt_get_volume_key_size(cd))()
        budget = lcs.KdfBudget(MEMORY_KIB)
        assert device._derive(key, ctypes.addressof(phrase), 4, [1, 3], budget) == 3
        assert any(key.raw)
        wrong = ctypes.create_string_buffer(b"nope", 4)
        assert device._derive(key, ctypes.addressof(wrong), 4, [1, 3], budget) == -1


def test_a_mapping_that_cannot_be_opened_with_its_header_is_unsupported(tmp_path: Path) -> None:
    # No device-mapper on the host: the real call fails, as for an unreadable header; that
    # must leave the device unprotected (UnsupportedDevice), not fail the whole arm.
    library = _library()
    with pytest.raises(lcs.UnsupportedDevice, match="its detached header cannot be read"):
        lcs.Device(library, "cryptlockd-test-none", str(tmp_path / "gone.hdr"))
    with pytest.raises(lcs.CryptError, match="crypt_init_by_name"):
        lcs.Device(library, "cryptlockd-test-none")


def test_a_resume_in_a_child_comes_back_to_the_parents_device(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The KDF and the resume happen in the child (its FakeLib is a copy): what the record
    # and the next cycle need comes back in its answer.
    monkeypatch.setattr(kdf, "lock_on_fault", lambda: None)  # the guest shows the lock
    lib = FakeLib(good_slot=1)
    dev = _fake_device(lib, [0, 1])
    derived: list[float] = []
    ok, at = dev.resume_in_child(0, 4, derived.append).finish()
    assert ok and dev.tried == [0, 1] and dev.last_keyslot == 1
    assert lib.tried == [] and lib.resumed == []  # none of it in this process
    assert len(derived) == 1 and derived[0] <= at
    lib.good_slot = 5
    ok, _ = dev.resume_in_child(0, 4, derived.append).finish()
    assert not ok and dev.tried == [0, 1, 1, 0] and dev.last_keyslot == 1
    assert len(derived) == 1
    # A libcryptsetup error in the child is raised here, its tries still counted.
    dev.library.messages.append("Device busy")
    lib.good_slot = 0
    monkeypatch.setattr(FakeLib, "crypt_resume_by_volume_key", lambda *a: -16)
    with pytest.raises(ChildError, match=r"crypt_resume_by_volume_key\(root\).*Device busy"):
        dev.resume_in_child(0, 4).finish()
    assert dev.tried[-1] == 0


def test_on_derived_marks_the_end_of_the_kdf_before_the_resume() -> None:
    # The record's `derived:<name>` step: it tells the KDF's time from the resume's.
    lib = FakeLib(good_slot=1)
    dev = _fake_device(lib, [0, 1])
    seen: list[tuple[list[int], list[bytes]]] = []

    def derived() -> None:
        seen.append((list(lib.tried), list(lib.resumed)))

    assert dev.resume_by_passphrase(0, 4, on_derived=derived)
    assert seen == [([0, 1], [])] and lib.resumed == [b"root"]
    lib.good_slot, seen[:] = 5, []
    assert not dev.resume_by_passphrase(0, 4, on_derived=derived) and seen == []


@pytest.mark.skipif(os.geteuid() != 0, reason="libcryptsetup locks under /run/cryptsetup")
def test_keyslot_priorities_are_read_and_tried_as_cryptsetup_tries_them(tmp_path: Path) -> None:
    # `cryptsetup config --priority`, through the real library: slot 1 ignore, slot 5
    # prefer, slot 3 normal, all with this passphrase. Slot 5 goes first, slot 1 never.
    with luks2_image(tmp_path, "crypt_keyslot_set_priority") as (library, cd):
        lib = library.lib
        for slot in (1, 5):
            assert lib.crypt_keyslot_add_by_volume_key(cd, slot, None, 0, b"unit", 4) == slot
        assert lib.crypt_keyslot_set_priority(cd, 1, lcs.PRIORITY_IGNORE) == 0
        assert lib.crypt_keyslot_set_priority(cd, 5, lcs.PRIORITY_PREFER) == 0
        device = header_device(library, cd)
        assert device.slots == [1, 3, 5]
        assert device.priorities == {1: lcs.PRIORITY_IGNORE, 5: lcs.PRIORITY_PREFER}
        order = lcs.keyslot_order(device.slots, -1, device.priorities)
        assert order == [5, 3]
        device.derives_alone = False
        key = (ctypes.c_char * lib.crypt_get_volume_key_size(cd))()
        budget = lcs.KdfBudget(MEMORY_KIB)
        phrase = ctypes.create_string_buffer(b"unit", 4)
        assert device._derive(key, ctypes.addressof(phrase), 4, order, budget) == 5
        wrong = ctypes.create_string_buffer(b"nope", 4)
        assert device._derive(key, ctypes.addressof(wrong), 4, order, budget) == -1
        assert device.tried == [5, 5, 3]
