"""The dm ioctl buffers that close a skipped mapping (cryptlockd/helper/dm_ioctl.py), laid
out as <linux/dm-ioctl.h> says."""

from __future__ import annotations

import struct

from cryptlockd.helper import dm_ioctl


def test_a_plain_request_is_one_dm_ioctl_of_312_bytes() -> None:
    buf = dm_ioctl.pack("usb", flags=1 << 17)
    assert len(buf) == 312
    assert struct.unpack_from("=3I", buf) == (4, 27, 0)
    assert struct.unpack_from("=III", buf, 12) == (312, 312, 0)
    assert struct.unpack_from("=I", buf, 28)[0] == 1 << 17  # flags
    assert buf[48:52] == b"usb\0"  # name


def test_a_table_load_carries_one_error_target_over_the_whole_device() -> None:
    buf = dm_ioctl.pack("usb", 1, (81920, "error"))
    assert len(buf) == 312 + 40 + 8
    assert struct.unpack_from("=III", buf, 12) == (360, 312, 1)
    start, length, status, nxt, kind = struct.unpack_from("=QQiI16s", buf, 312)
    assert (start, length, status, nxt) == (0, 81920, 0, 48)
    assert kind.rstrip(b"\0") == b"error" and buf[352:] == b"\0" * 8


def test_ioctl_numbers() -> None:
    # DM_TABLE_LOAD and DM_DEV_SUSPEND as the kernel headers compute them.
    assert dm_ioctl._iowr(9) == 0xC138FD09
    assert dm_ioctl._iowr(6) == 0xC138FD06
