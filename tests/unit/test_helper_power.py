from __future__ import annotations

from cryptlockd.helper import power


def test_block_mounts() -> None:
    info = (
        "22 1 253:0 / / rw,relatime - ext4 /dev/mapper/root rw\n"
        "23 22 0:5 / /proc rw - proc proc rw\n"
        "24 22 253:1 / /da\\040ta rw - ext4 /dev/mapper/data rw\n"
        "25 22 0:40 / /mnt/f rw - fuse.sshfs /dev/fake rw\n"
    )
    assert power.block_mounts(info) == ["/", "/da ta"]
