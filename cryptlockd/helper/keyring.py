"""Find and invalidate kernel-keyring copies of a LUKS2 volume key (SPEC 2.4.6).

In keyring mode cryptsetup loads the volume key as a `logon` key named
`cryptsetup:<LUKS UUID>-d<segment>` and the dm table only names it. `crypt_suspend` wipes
the dm-crypt copy, and drops the keyring copy only where its own process keyrings reach it.
A copy linked into a keyring that outlives its opener (a user, session or persistent
keyring, or a process that is still running) survives the suspend: that is what we look for.

/proc/keys lists every key the reader may view, whichever keyring holds it, so it is the
search. Invalidating needs the key's Search permission, which cryptsetup's keys grant only
to a possessor; a root process that did not open the device gains possession by linking
root's user and persistent keyrings into its own session keyring.

Stdlib only: this module runs in the helper's RAM filesystem.
"""

from __future__ import annotations

import ctypes
import errno
import os
import time

PROC_KEYS = "/proc/keys"
KEYCTL_LINK = 8
KEYCTL_INVALIDATE = 21
KEYCTL_GET_PERSISTENT = 22
KEY_SPEC_SESSION_KEYRING = -3
KEY_SPEC_USER_KEYRING = -4
# __NR_keyctl: the syscall has no libc wrapper without libkeyutils.
SYS_KEYCTL = {
    "x86_64": 250,
    "aarch64": 219,
    "i686": 288,
    "i386": 288,
    "armv7l": 311,
    "riscv64": 219,
    "ppc64le": 280,
    "s390x": 280,
}
# Key types that can carry a volume key: cryptsetup uses logon (user for
# --link-vk-to-keyring when asked).
VOLUME_KEY_TYPES = ("logon", "user")
# How long an invalidated key may take to leave /proc/keys: the key garbage collector
# (a workqueue, not frozen with the tasks) frees the payload with kfree_sensitive.
GC_DEADLINE = 3.0

_libc = ctypes.CDLL(None, use_errno=True)


class ProcKey:
    __slots__ = ("description", "flags", "serial", "type")

    def __init__(self, serial: int, flags: str, type: str, description: str) -> None:
        self.serial = serial
        self.flags = flags
        self.type = type
        self.description = description

    def __repr__(self) -> str:
        return f"ProcKey({self.serial:08x}, {self.flags!r}, {self.type!r}, {self.description!r})"

    @property
    def invalidated(self) -> bool:
        # /proc/keys flags: I R D Q U N i (instantiated, revoked, dead, quota,
        # under construction, negative, invalidated).
        return "i" in self.flags or "D" in self.flags or "R" in self.flags


def parse_proc_keys(text: str) -> list[ProcKey]:
    """Lines of /proc/keys: `serial flags usage expiry perm uid gid type description[: summary]`.
    The description may itself contain ': ' only at the summary, so the summary is split
    off at the last ': '. Pure."""
    keys: list[ProcKey] = []
    for line in text.splitlines():
        fields = line.split(None, 8)
        if len(fields) < 9:
            continue
        try:
            serial = int(fields[0], 16)
        except ValueError:
            continue
        rest = fields[8]
        desc = rest.rpartition(": ")[0] if ": " in rest else rest
        keys.append(ProcKey(serial, fields[1], fields[7], desc.rstrip()))
    return keys


def volume_key_prefix(luks_uuid: str) -> str:
    return f"cryptsetup:{luks_uuid.lower()}-d"


def is_volume_key(key: ProcKey, luks_uuid: str) -> bool:
    prefix = volume_key_prefix(luks_uuid)
    if key.type not in VOLUME_KEY_TYPES or not key.description.lower().startswith(prefix):
        return False
    return key.description[len(prefix) :].isdigit()


def volume_keys(keys: list[ProcKey], luks_uuid: str) -> list[ProcKey]:
    return [k for k in keys if is_volume_key(k, luks_uuid)]


def read_proc_keys() -> list[ProcKey]:
    with open(PROC_KEYS) as f:
        return parse_proc_keys(f.read())


def _keyctl(*args: int) -> int:
    nr = SYS_KEYCTL.get(os.uname().machine)
    if nr is None:
        raise OSError(errno.ENOSYS, f"keyctl syscall number unknown on {os.uname().machine}")
    rc = int(_libc.syscall(ctypes.c_long(nr), *(ctypes.c_long(a) for a in args)))
    if rc < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return rc


def invalidate_key(serial: int) -> None:
    _keyctl(KEYCTL_INVALIDATE, serial)


def gain_possession() -> list[str]:
    """Link root's user and persistent keyrings into our session keyring, so that keys in
    them count as ours (possessor permissions). Returns what failed, for the record."""
    failed: list[str] = []
    try:
        _keyctl(KEYCTL_LINK, KEY_SPEC_USER_KEYRING, KEY_SPEC_SESSION_KEYRING)
    except OSError as e:
        failed.append(f"user keyring: {e.strerror}")
    try:
        _keyctl(KEYCTL_GET_PERSISTENT, -1, KEY_SPEC_SESSION_KEYRING)
    except OSError as e:
        failed.append(f"persistent keyring: {e.strerror}")
    return failed


class KeyringOps:
    """The kernel side of `sweep`, replaceable in unit tests."""

    def read(self) -> list[ProcKey]:
        return read_proc_keys()

    def invalidate(self, serial: int) -> None:
        invalidate_key(serial)

    def gain_possession(self) -> list[str]:
        return gain_possession()

    def pause(self) -> None:
        time.sleep(0.05)

    def clock(self) -> float:
        return time.monotonic()


def sweep(luks_uuid: str, ops: KeyringOps | None = None, gc_deadline: float = GC_DEADLINE) -> str:
    """Invalidates every viewable keyring copy of the device's volume key and checks that
    they are gone. Returns 'none' (nothing found), 'invalidated: <serials>' (found and
    gone), or a string starting 'left: ' or 'error: ' (the device is not protected)."""
    ops = ops or KeyringOps()
    try:
        found = volume_keys(ops.read(), luks_uuid)
    except OSError as e:
        if e.errno == errno.ENOENT:
            return "none (kernel without keyrings)"
        return f"error: cannot read {PROC_KEYS}: {e.strerror}"
    if not found:
        return "none"
    errors: dict[int, str] = {}
    possessed = False
    for key in found:
        if key.invalidated:
            continue
        try:
            ops.invalidate(key.serial)
            continue
        except OSError as e:
            if e.errno != errno.EACCES or possessed:
                errors[key.serial] = e.strerror or str(e)
                continue
        possessed = True
        notes = ops.gain_possession()
        try:
            ops.invalidate(key.serial)
        except OSError as e:
            note = f" ({'; '.join(notes)})" if notes else ""
            errors[key.serial] = (e.strerror or str(e)) + note
    serials = {k.serial for k in found}
    deadline = ops.clock() + gc_deadline
    while True:
        try:
            left = [k for k in volume_keys(ops.read(), luks_uuid) if k.serial in serials]
        except OSError as e:
            return f"error: cannot re-read {PROC_KEYS}: {e.strerror}"
        if not left or ops.clock() >= deadline:
            break
        ops.pause()
    names = " ".join(f"{s:08x}" for s in sorted(serials))
    if not left:
        return f"invalidated: {names}"
    details = ", ".join(
        f"{k.serial:08x} {k.type} {k.description}"
        + (
            f" ({errors[k.serial]})"
            if k.serial in errors
            else " (invalidated, not yet collected)"
            if k.invalidated
            else ""
        )
        for k in left
    )
    return f"left: {details}"
