"""Check that a suspended dm-crypt mapping no longer holds its key (SPEC 2.4.6).

Two places can hold it: the dm-crypt target, and a kernel keyring (keyring.py).
The dm part reads the live table with the DM_TABLE_STATUS ioctl on /dev/mapper/control.
For a crypt target the kernel prints the key as hex, or as ':<size>:logon:<description>'
in keyring mode; after `crypt_suspend` (dm message "key wipe") it prints zeros. Nothing
here reads the table before the suspend, so the key itself never passes through this
process. The same answer carries the dm UUID, which names the LUKS UUID, which names
the keyring copies.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import struct

from cryptlockd.helper import keyring

DM_CONTROL = "/dev/mapper/control"
_DM_IOCTL_FMT = "=3IIIIiIIIQ128s129s7s"  # struct dm_ioctl, 312 bytes
_DM_IOCTL_SIZE = struct.calcsize(_DM_IOCTL_FMT)
_DM_TARGET_FMT = "=QQiI16s"  # struct dm_target_spec, 40 bytes
_DM_TARGET_SIZE = struct.calcsize(_DM_TARGET_FMT)
_DM_TABLE_STATUS_CMD = 12
_DM_STATUS_TABLE_FLAG = 1 << 4
_DM_SUSPEND_FLAG = 1 << 1
_DM_BUFFER_FULL_FLAG = 1 << 8
_BUFSIZE = 16384


def _iowr(nr: int, size: int) -> int:
    return (3 << 30) | (size << 16) | (0xFD << 8) | nr


DM_TABLE_STATUS = _iowr(_DM_TABLE_STATUS_CMD, _DM_IOCTL_SIZE)


def key_field_state(params: str) -> str:
    """'zeroed', 'present' or 'unknown' for a crypt target's parameter string
    ('<cipher> <key> <iv_offset> <dev> <offset> ...'). Pure."""
    fields = params.split()
    if len(fields) < 2:
        return "unknown"
    key = fields[1]
    if key.startswith(":"):
        return "present"  # a keyring reference: the key still sits in a kernel keyring
    if key and all(c in "0123456789abcdefABCDEF" for c in key):
        return "zeroed" if set(key) == {"0"} else "present"
    if key == "-":
        return "zeroed"  # kernels that print no key at all
    return "unknown"


def parse_table(buf: bytes | bytearray, data_start: int, count: int) -> list[tuple[str, str]]:
    """[(target type, params)] from a DM_TABLE_STATUS answer. Pure."""
    out: list[tuple[str, str]] = []
    off = data_start
    for _ in range(count):
        _, _, _, nxt, ttype = struct.unpack_from(_DM_TARGET_FMT, buf, off)
        start = off + _DM_TARGET_SIZE
        end = buf.index(b"\0", start)
        out.append((ttype.rstrip(b"\0").decode(), bytes(buf[start:end]).decode()))
        off += nxt if nxt else 0
        if not nxt:
            break
    return out


def luks_uuid_from_dm_uuid(dm_uuid: str) -> str | None:
    """'CRYPT-LUKS2-<32 hex>-<name>' -> the LUKS UUID as cryptsetup prints it (dashed,
    which is how it names the keyring copies). Pure."""
    parts = dm_uuid.split("-", 3)
    if len(parts) < 3 or parts[0] != "CRYPT" or not parts[1].startswith("LUKS"):
        return None
    h = parts[2].lower()
    if len(h) != 32 or any(c not in "0123456789abcdef" for c in h):
        return None
    return f"{h[:8]}-{h[8:12]}-{h[12:16]}-{h[16:20]}-{h[20:]}"


def table_key_state(name: str) -> tuple[bool, str]:
    suspended, state, _ = table_state(name)
    return suspended, state


def table_state(name: str) -> tuple[bool, str, str]:
    """(dm says suspended, key state of its crypt target, dm UUID). The ioctl answer is
    wiped after parsing: for a device that was not suspended it would hold the key."""
    buf = bytearray(_BUFSIZE)
    struct.pack_into(
        _DM_IOCTL_FMT,
        buf,
        0,
        4,
        0,
        0,
        _BUFSIZE,
        _DM_IOCTL_SIZE,
        0,
        0,
        _DM_STATUS_TABLE_FLAG,
        0,
        0,
        0,
        name.encode()[:127],
        b"",
        b"",
    )
    fd = os.open(DM_CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, DM_TABLE_STATUS, buf, True)
        fields = struct.unpack_from(_DM_IOCTL_FMT, buf, 0)
        data_start, count, flags = fields[4], fields[5], fields[7]
        dm_uuid = fields[12].split(b"\0", 1)[0].decode(errors="replace")
        if flags & _DM_BUFFER_FULL_FLAG:
            return bool(flags & _DM_SUSPEND_FLAG), "unknown", dm_uuid
        state = "unknown"
        for ttype, params in parse_table(buf, data_start, count):
            if ttype == "crypt":
                state = key_field_state(params)
                del params
        return bool(flags & _DM_SUSPEND_FLAG), state, dm_uuid
    finally:
        os.close(fd)
        ctypes.memset((ctypes.c_char * len(buf)).from_buffer(buf), 0, len(buf))


def keyring_clean(result: str) -> bool:
    return result.startswith(("none", "invalidated"))


def is_protected(v: dict[str, str]) -> bool:
    """A device counts as wiped only when both places are proven empty. Pure."""
    return v.get("dm_table_key") == "zeroed" and keyring_clean(v.get("keyring", ""))


def verify_device(name: str, ops: keyring.KeyringOps | None = None) -> dict[str, str]:
    """After crypt_suspend: the dm table check, then the keyring sweep (which repairs
    what it can). Every value is a short string for the cycle record."""
    out: dict[str, str] = {}
    try:
        suspended, key, dm_uuid = table_state(name)
        out.update(dm_suspended="yes" if suspended else "no", dm_table_key=key)
    except OSError as e:
        out["dm_table_key"] = f"error: {e.strerror or e}"
        dm_uuid = ""
    luks_uuid = luks_uuid_from_dm_uuid(dm_uuid) if dm_uuid else None
    if luks_uuid is None:
        out["keyring"] = f"error: no LUKS UUID in the dm UUID {dm_uuid!r}"
    else:
        out["luks_uuid"] = luks_uuid
        try:
            out["keyring"] = keyring.sweep(luks_uuid, ops)
        except Exception as e:
            out["keyring"] = f"error: {e}"
    out["protected"] = "yes" if is_protected(out) else "no"
    return out
