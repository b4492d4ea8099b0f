"""Closing a suspended mapping that will not come back, with device-mapper's own ioctls.

libcryptsetup's forced deactivation does not do it for a suspended device (it only swaps
in the error target for a device it can query as active), and the device cannot be
resumed without its key. So: load dm's `error` target as the inactive table, resume (the
error table takes over; I/O now fails at once instead of waiting for good), then ask for
a deferred removal (it goes once nothing holds it open). <linux/dm-ioctl.h>, version 4.
"""

from __future__ import annotations

import fcntl
import os
import struct

CONTROL = "/dev/mapper/control"
SYS_BLOCK = "/sys/block"

_VERSION = (4, 27, 0)  # 4.27: deferred removal (Linux 3.13)
# struct dm_ioctl: version[3], data_size, data_start, target_count, open_count, flags,
# event_nr, padding, dev, name[128], uuid[129], data[7].
_IOCTL = struct.Struct("=3IIIIiIIIQ128s129s7s")
# struct dm_target_spec: sector_start, length, status, next, target_type[16].
_TARGET = struct.Struct("=QQiI16s")
_DM_READONLY_FLAG = 1 << 0
_DM_DEFERRED_REMOVE = 1 << 17
_DM_DEV_REMOVE, _DM_DEV_SUSPEND, _DM_TABLE_LOAD = 4, 6, 9


def _iowr(nr: int) -> int:
    return (3 << 30) | (_IOCTL.size << 16) | (0xFD << 8) | nr


def pack(name: str, flags: int = 0, target: tuple[int, str] | None = None) -> bytes:
    """A dm_ioctl for `name`; with target (length in sectors, type), one target spec with
    empty parameters follows (DM_TABLE_LOAD)."""
    extra = b""
    if target is not None:
        length, kind = target
        params = b"\0" * 8  # "" and its NUL, padded to 8 bytes
        extra = _TARGET.pack(0, length, 0, _TARGET.size + len(params), kind.encode()) + params
    return (
        _IOCTL.pack(
            *_VERSION,
            _IOCTL.size + len(extra),
            _IOCTL.size,
            1 if target is not None else 0,
            0,
            flags,
            0,
            0,
            0,
            name.encode(),
            b"",
            b"",
        )
        + extra
    )


def _call(fd: int, nr: int, buf: bytes) -> None:
    fcntl.ioctl(fd, _iowr(nr), bytearray(buf))


def _sectors(name: str) -> int:
    for entry in os.listdir(SYS_BLOCK):
        try:
            with open(os.path.join(SYS_BLOCK, entry, "dm", "name")) as f:
                if f.read().strip() != name:
                    continue
            with open(os.path.join(SYS_BLOCK, entry, "size")) as f:
                return int(f.read())
        except OSError:
            continue
    raise FileNotFoundError(f"no mapping {name!r} in {SYS_BLOCK}")


def close_with_error_target(name: str) -> None:
    """The mapping `name` answers every I/O with an error from now on, and is removed once
    nothing holds it. Raises OSError when the kernel refuses a step."""
    sectors = _sectors(name)
    fd = os.open(CONTROL, os.O_RDWR | os.O_CLOEXEC)
    try:
        _call(fd, _DM_TABLE_LOAD, pack(name, _DM_READONLY_FLAG, (sectors, "error")))
        _call(fd, _DM_DEV_SUSPEND, pack(name))  # without DM_SUSPEND_FLAG: resume
        _call(fd, _DM_DEV_REMOVE, pack(name, _DM_DEFERRED_REMOVE))
    finally:
        os.close(fd)
