"""Finding the device of "/" in /proc/self/mountinfo."""

from __future__ import annotations

from pathlib import Path

from cryptlockd.daemon.mountinfo import parse_mountinfo_root


def test_root_entry() -> None:
    text = (
        "22 1 0:21 / /proc rw,relatime - proc proc rw\n"
        "27 1 253:1 / / rw,relatime shared:1 - ext4 /dev/mapper/vg0-root rw,errors=remount-ro\n"
        "28 27 252:1 / /boot rw,relatime shared:2 - ext4 /dev/vda1 rw\n"
    )
    assert parse_mountinfo_root(text) == ("253:1", "/dev/mapper/vg0-root")


def test_no_optional_fields_and_several_optional_fields() -> None:
    assert parse_mountinfo_root("1 0 8:2 / / rw - xfs /dev/sda2 rw\n") == ("8:2", "/dev/sda2")
    line = "1 0 8:3 / / rw shared:1 master:2 propagate_from:3 - xfs /dev/sda3 rw\n"
    assert parse_mountinfo_root(line) == ("8:3", "/dev/sda3")


def test_last_root_entry_wins() -> None:
    text = "1 0 8:1 / / rw - ext4 /dev/sda1 rw\n2 1 253:0 / / rw - ext4 /dev/mapper/cryptroot rw\n"
    assert parse_mountinfo_root(text) == ("253:0", "/dev/mapper/cryptroot")


def test_bind_mount_of_a_subdirectory_is_not_root() -> None:
    # Field 4 is the root *within* the filesystem; only field 5, the mount point, counts.
    text = "1 0 8:1 / /mnt rw - ext4 /dev/sda1 rw\n2 0 8:2 /srv / rw - ext4 /dev/sda2 rw\n"
    assert parse_mountinfo_root(text) == ("8:2", "/dev/sda2")


def test_escaped_source() -> None:
    text = "1 0 0:30 / / rw - btrfs /dev/mapper/my\\040disk rw\n"
    assert parse_mountinfo_root(text) == ("0:30", "/dev/mapper/my disk")


def test_no_root_and_garbage() -> None:
    assert parse_mountinfo_root("") is None
    assert parse_mountinfo_root("garbage\n1 2 3\n") is None
    assert parse_mountinfo_root("1 0 8:1 / /home rw - ext4 /dev/sda1 rw\n") is None


def test_this_hosts_mountinfo_has_a_root() -> None:
    found = parse_mountinfo_root(Path("/proc/self/mountinfo").read_text())
    assert found is not None
    assert ":" in found[0]
