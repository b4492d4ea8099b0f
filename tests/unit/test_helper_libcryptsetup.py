"""The helper's libcryptsetup binding.

Its ctypes mirror of struct crypt_pbkdf_type, against the real libcryptsetup: a LUKS2
header is formatted into a plain file (no device-mapper needed), with an Argon2id keyslot
of known cost, and read back through Device.pbkdf_memory_kib(). And the keyslot that took
the passphrase last time is tried first."""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import pytest

from cryptlockd.helper import libcryptsetup as lcs

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


@pytest.mark.skipif(os.geteuid() != 0, reason="libcryptsetup locks under /run/cryptsetup")
def test_keyslot_argon2_memory_is_read_at_the_right_offset(tmp_path: Path) -> None:
    library = _library()
    if not library.has("crypt_keyslot_get_pbkdf"):
        pytest.skip("this libcryptsetup predates crypt_keyslot_get_pbkdf (2.0)")
    image = tmp_path / "luks2.img"
    with image.open("wb") as f:
        f.truncate(32 * 1024 * 1024)
    cd = _format(library, image)
    try:
        device = lcs.Device.__new__(lcs.Device)
        device.library, device.name, device.cd = library, "unit", cd
        device.slots = device.active_keyslots()
        assert device.slots == [3]
        # Were a field of the struct missing, this would read the iteration count (4).
        assert device.pbkdf_memory_kib() == MEMORY_KIB
    finally:
        library.lib.crypt_free(cd)


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


def test_a_mapping_that_cannot_be_opened_with_its_header_is_unsupported(tmp_path: Path) -> None:
    # No device-mapper on the host: the real call fails, as for an unreadable header; that
    # must leave the device unprotected (UnsupportedDevice), not fail the whole arm.
    library = _library()
    with pytest.raises(lcs.UnsupportedDevice, match="its detached header cannot be read"):
        lcs.Device(library, "cryptlockd-test-none", str(tmp_path / "gone.hdr"))
    with pytest.raises(lcs.CryptError, match="crypt_init_by_name"):
        lcs.Device(library, "cryptlockd-test-none")
