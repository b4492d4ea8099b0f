"""ctypes binding to the few libcryptsetup calls the cycle needs.

Features are detected by symbol: libcryptsetup 2.6.1 (Debian 12) has no crypt_get_version.
"""

from __future__ import annotations

import contextlib
import ctypes
import os

from cryptlockd.helper.kdf import (
    DM_LOCK,
    PRIORITY_IGNORE,
    PRIORITY_PREFER,
    ChildAttempt,
    ChildError,
    KdfBudget,
    kernel_skcipher_name,
    kernel_skcipher_usable,
    keyslot_order,
)
from cryptlockd.helper.protocol import boottime

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from collections.abc import Callable
    from typing import Any

SONAME = "libcryptsetup.so.12"
CRYPT_ANY_SLOT = -1
CRYPT_SLOT_ACTIVE = 2
CRYPT_SLOT_ACTIVE_LAST = 3
MAX_KEYSLOTS = 32
LUKS_TYPES = ("LUKS1", "LUKS2")

_LOG_CB = ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)


class CryptError(Exception):
    def __init__(self, call: str, name: str, rc: int, messages: list[str]) -> None:
        self.rc = rc
        detail = f" ({messages[-1]})" if messages else ""
        super().__init__(f"{call}({name}): {os.strerror(-rc) if rc < 0 else rc}{detail}")


class _PbkdfType(ctypes.Structure):
    # struct crypt_pbkdf_type of libcryptsetup.h, field for field: a missing field shifts
    # every later one (without `iterations`, max_memory_kb read the iteration count).
    _fields_ = [
        ("type", ctypes.c_char_p),
        ("hash", ctypes.c_char_p),
        ("time_ms", ctypes.c_uint32),
        ("iterations", ctypes.c_uint32),
        ("max_memory_kb", ctypes.c_uint32),
        ("parallel_threads", ctypes.c_uint32),
        ("flags", ctypes.c_uint32),
    ]


class Library:
    def __init__(self, soname: str = SONAME) -> None:
        self.lib = ctypes.CDLL(soname, use_errno=True)
        self.messages: list[str] = []

        def collect(level: int, msg: bytes | None, usrptr: Any) -> None:
            # libcryptsetup would print to stderr; keep them to report once thawed.
            if msg:
                self.messages.append(msg.decode(errors="replace").strip())
            del self.messages[:-50]

        self._log_cb = _LOG_CB(collect)
        lib = self.lib
        lib.crypt_set_log_callback(None, self._log_cb, None)
        lib.crypt_init_by_name.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_char_p]
        lib.crypt_init_by_name_and_header.argtypes = [
            ctypes.POINTER(ctypes.c_void_p),
            ctypes.c_char_p,
            ctypes.c_char_p,
        ]
        lib.crypt_free.argtypes = [ctypes.c_void_p]
        lib.crypt_free.restype = None
        lib.crypt_suspend.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.crypt_resume_by_passphrase.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_size_t,
        ]
        lib.crypt_get_volume_key_size.argtypes = [ctypes.c_void_p]
        if self.has("crypt_resume_by_volume_key"):
            lib.crypt_volume_key_get.argtypes = [
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.c_void_p,
                ctypes.POINTER(ctypes.c_size_t),
                ctypes.c_void_p,
                ctypes.c_size_t,
            ]
            lib.crypt_resume_by_volume_key.argtypes = [
                ctypes.c_void_p,
                ctypes.c_char_p,
                ctypes.c_void_p,
                ctypes.c_size_t,
            ]
        lib.crypt_get_type.argtypes = [ctypes.c_void_p]
        lib.crypt_get_type.restype = ctypes.c_char_p
        lib.crypt_keyslot_status.argtypes = [ctypes.c_void_p, ctypes.c_int]
        if self.has("crypt_resume_by_keyfile_device_offset"):
            lib.crypt_resume_by_keyfile_device_offset.argtypes = [
                ctypes.c_void_p,
                ctypes.c_char_p,
                ctypes.c_int,
                ctypes.c_char_p,
                ctypes.c_size_t,
                ctypes.c_uint64,
            ]
        if self.has("crypt_keyslot_get_encryption"):
            fn = lib.crypt_keyslot_get_encryption
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.POINTER(ctypes.c_size_t)]
            fn.restype = ctypes.c_char_p
        if self.has("crypt_keyslot_get_priority"):
            lib.crypt_keyslot_get_priority.argtypes = [ctypes.c_void_p, ctypes.c_int]
        if self.has("crypt_keyslot_get_pbkdf"):
            lib.crypt_keyslot_get_pbkdf.argtypes = [
                ctypes.c_void_p,
                ctypes.c_int,
                ctypes.POINTER(_PbkdfType),
            ]

    def has(self, symbol: str) -> bool:
        return hasattr(self.lib, symbol)

    def version(self) -> str:
        if self.has("crypt_get_version"):
            fn = self.lib.crypt_get_version
            fn.restype = ctypes.c_char_p
            return str(fn().decode())
        return "unknown (no crypt_get_version)"

    def _check(self, call: str, name: str, rc: int) -> int:
        if rc < 0:
            raise CryptError(call, name, rc, self.messages)
        return rc


class UnsupportedDevice(Exception):
    """A mapping the helper must not suspend: without a LUKS header it knows, every resume
    would fail (EINVAL) and the machine would never come back."""


class Device:
    """An active dm-crypt mapping, opened by its dm name, with its LUKS header: on the
    device, or detached (crypttab header=, `header` a path the helper can open)."""

    def __init__(self, library: Library, name: str, header: str = "") -> None:
        self.library = library
        self.name = name
        self._bname = name.encode()
        self._bheader = header.encode() if header else None
        self.cd = self._open()
        self.last_keyslot = CRYPT_ANY_SLOT
        # Each keyslot a passphrase was tried on (one KDF run each), in order, for the
        # record: what a forgotten keyslot cost. CRYPT_ANY_SLOT: libcryptsetup tried them all.
        self.tried: list[int] = []
        self.slots = self.active_keyslots()
        self.priorities = self.keyslot_priorities()
        # Probed now, with root up: a probe after the wake could make the kernel load a
        # module from the suspended root.
        self.derives_alone = not self._keyslots_in_kernel()

    def _keyslots_in_kernel(self) -> bool:
        """Whether libcryptsetup decrypts every keyslot through the kernel's AF_ALG
        socket. Where it cannot, it falls back to temporary dm-crypt mappings, that is to
        libdevmapper, which is not thread-safe: such a device derives under `DM_LOCK`."""
        lib = self.library.lib
        if not self.library.has("crypt_keyslot_get_encryption"):
            return False
        for slot in self.slots:
            size = ctypes.c_size_t()
            spec = lib.crypt_keyslot_get_encryption(self.cd, slot, ctypes.byref(size))
            name = kernel_skcipher_name(spec.decode() if spec else "")
            if name is None or not kernel_skcipher_usable(name):
                return False
        return True

    def _open(self) -> ctypes.c_void_p:
        """A context with the LUKS header loaded. A detached header without `header`
        gives an untyped context and success from crypt_init_by_name; that is an error."""
        lib = self.library.lib
        cd = ctypes.c_void_p()
        if self._bheader is None:
            rc = lib.crypt_init_by_name(ctypes.byref(cd), self._bname)
            self.library._check("crypt_init_by_name", self.name, rc)
        else:
            rc = lib.crypt_init_by_name_and_header(ctypes.byref(cd), self._bname, self._bheader)
            if rc < 0:
                err = CryptError("crypt_init_by_name_and_header", self.name, rc, [])
                raise UnsupportedDevice(f"{self.name}: its detached header cannot be read: {err}")
        t = lib.crypt_get_type(cd)
        kind = t.decode() if t else ""
        if kind not in LUKS_TYPES:
            lib.crypt_free(cd)
            why = f"a {kind} mapping" if kind else "no LUKS header found (a detached header?)"
            raise UnsupportedDevice(f"{self.name}: {why}")
        return cd

    def reload(self) -> None:
        """Reads the header again. After the sleep, so that resume uses the keyslots on
        disk now, not those of when the (idle) helper loaded it. Only once everything
        the device needs is back (resume.py); keeps the old handle if that fails."""
        fresh = self._open()
        self.library.lib.crypt_free(self.cd)
        self.cd = fresh
        self.slots = self.active_keyslots()
        self.priorities = self.keyslot_priorities()

    def luks_type(self) -> str:
        t = self.library.lib.crypt_get_type(self.cd)
        return t.decode() if t else ""

    def pbkdf_memory_kib(self) -> int:
        """The largest KDF memory of the active keyslots (Argon2; 0 for PBKDF2/LUKS1)."""
        lib = self.library.lib
        if not self.library.has("crypt_keyslot_get_pbkdf"):
            return 0
        most = 0
        for slot in self.slots:
            p = _PbkdfType()
            if lib.crypt_keyslot_get_pbkdf(self.cd, slot, ctypes.byref(p)) == 0:
                most = max(most, int(p.max_memory_kb))
        return most

    def suspend(self) -> None:
        rc = self.library.lib.crypt_suspend(self.cd, self._bname)
        self.library._check("crypt_suspend", self.name, rc)

    def active_keyslots(self) -> list[int]:
        lib = self.library.lib
        active = (CRYPT_SLOT_ACTIVE, CRYPT_SLOT_ACTIVE_LAST)
        return [s for s in range(MAX_KEYSLOTS) if lib.crypt_keyslot_status(self.cd, s) in active]

    def keyslot_priorities(self) -> dict[int, int]:
        """The active keyslots' LUKS2 priorities that are not `normal` (kdf.keyslot_order)."""
        lib = self.library.lib
        if not self.library.has("crypt_keyslot_get_priority"):
            return {}
        found = {s: int(lib.crypt_keyslot_get_priority(self.cd, s)) for s in self.slots}
        return {s: p for s, p in found.items() if p in (PRIORITY_IGNORE, PRIORITY_PREFER)}

    def resume_by_passphrase(
        self,
        address: int,
        length: int,
        budget: KdfBudget | None = None,
        on_derived: Callable[[], None] | None = None,
    ) -> bool:
        """address: of the passphrase bytes (a SecretBuffer), so nothing is copied. True
        when a keyslot took it, False for a wrong passphrase; raises on other errors. The
        keyslot that worked last time is tried first: each try costs a full KDF run.

        Safe to call from several threads at once for different devices (kdf.py): the KDF
        runs outside `DM_LOCK`, within `budget`, and only the resume takes the lock.
        `on_derived` runs once the key is derived, before the resume (for the record)."""
        slots = (
            keyslot_order(self.slots, self.last_keyslot, self.priorities)
            if self.slots
            else [CRYPT_ANY_SLOT]
        )
        if not self.library.has("crypt_resume_by_volume_key"):
            with DM_LOCK:
                return self._resume_by_passphrase_in_one(address, length, slots)
        size = self.library.lib.crypt_get_volume_key_size(self.cd)
        # A ctypes buffer, locked like all of the helper's memory, wiped below.
        key = (ctypes.c_char * max(size, 1))()
        try:
            slot = self._derive(key, address, length, slots, budget or KdfBudget(0))
            if slot < 0:
                return False
            if on_derived is not None:
                on_derived()
            with DM_LOCK:
                rc = self.library.lib.crypt_resume_by_volume_key(self.cd, self._bname, key, size)
            self.library._check("crypt_resume_by_volume_key", self.name, rc)
            self.last_keyslot = slot
            return True
        finally:
            ctypes.memset(key, 0, ctypes.sizeof(key))

    def resume_in_child(
        self, address: int, length: int, on_derived: Callable[[float], None] | None = None
    ) -> ChildAttempt:
        """resume_by_passphrase in a child process of its own (kdf.ChildAttempt), started
        now. What it did comes back to this Device when the caller finishes it: the
        keyslots tried, the one that took it, and (`on_derived`, with the time) when the
        key was derived. Raises kdf.ChildFailed when it cannot fork."""

        def run() -> dict[str, Any]:
            before, derived = len(self.tried), []
            try:
                ok = self.resume_by_passphrase(
                    address, length, on_derived=lambda: derived.append(boottime())
                )
            except Exception as e:
                return {"error": str(e) or type(e).__name__, "tried": self.tried[before:]}
            return {
                "ok": ok,
                "tried": self.tried[before:],
                "slot": self.last_keyslot,
                "derived": derived[0] if derived else None,
            }

        def apply(answer: dict[str, Any]) -> bool:
            self.tried.extend(int(slot) for slot in answer.get("tried", []))
            if "error" in answer:
                raise ChildError(str(answer["error"]))
            derived = answer.get("derived")
            if on_derived is not None and isinstance(derived, (int, float)):
                on_derived(float(derived))
            if not answer.get("ok"):
                return False
            self.last_keyslot = int(answer["slot"])
            return True

        return ChildAttempt(run, apply)

    def _derive(
        self,
        key: ctypes.Array[ctypes.c_char],
        address: int,
        length: int,
        slots: list[int],
        budget: KdfBudget,
    ) -> int:
        """The volume key into `key` from the first of `slots` the passphrase opens: that
        keyslot, or -1 when none does."""
        lib = self.library.lib
        kib = self.pbkdf_memory_kib()
        budget.acquire(kib)
        alone = DM_LOCK if self.derives_alone else contextlib.nullcontext()
        try:
            with alone:
                for slot in slots:
                    self.tried.append(slot)
                    size = ctypes.c_size_t(ctypes.sizeof(key))
                    rc = lib.crypt_volume_key_get(
                        self.cd, slot, key, ctypes.byref(size), address, length
                    )
                    if rc >= 0:
                        return int(rc)
                    if rc not in (-1, -2):  # EPERM: wrong passphrase; ENOENT: slot not usable
                        self.library._check("crypt_volume_key_get", self.name, rc)
                return -1
        finally:
            budget.release(kib)

    def _resume_by_passphrase_in_one(self, address: int, length: int, slots: list[int]) -> bool:
        """An older libcryptsetup without crypt_resume_by_volume_key: KDF and resume in one
        call, so under `DM_LOCK`, one device at a time."""
        lib = self.library.lib
        for slot in slots:
            self.tried.append(slot)
            rc = lib.crypt_resume_by_passphrase(self.cd, self._bname, slot, address, length)
            if rc >= 0:
                self.last_keyslot = rc
                return True
            if rc not in (-1, -2):  # EPERM: wrong passphrase; ENOENT: slot not usable
                self.library._check("crypt_resume_by_passphrase", self.name, rc)
        return False

    def resume_by_keyfile(self, path: str, size: int = 0, offset: int = 0) -> None:
        lib = self.library.lib
        rc = lib.crypt_resume_by_keyfile_device_offset(
            self.cd, self._bname, CRYPT_ANY_SLOT, path.encode(), size, offset
        )
        self.library._check("crypt_resume_by_keyfile_device_offset", self.name, rc)

    def free(self) -> None:
        if self.cd:
            self.library.lib.crypt_free(self.cd)
            self.cd = ctypes.c_void_p()
