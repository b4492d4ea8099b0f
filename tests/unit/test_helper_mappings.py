"""The LUKS mappings the idle helper finds in sysfs (cryptlockd/helper/mappings.py)."""

from __future__ import annotations

from pathlib import Path

from cryptlockd.helper import mappings


def fake_dm(sys_block: Path, kname: str, name: str, uuid: str) -> None:
    (sys_block / kname / "dm").mkdir(parents=True)
    (sys_block / kname / "dm" / "name").write_text(name + "\n")
    (sys_block / kname / "dm" / "uuid").write_text(uuid + "\n")


def test_luks_mappings_from_sysfs(tmp_path: Path) -> None:
    fake_dm(tmp_path, "dm-0", "root", "CRYPT-LUKS2-aaaa-root")
    fake_dm(tmp_path, "dm-1", "vg-home", "LVM-xyz")
    fake_dm(tmp_path, "dm-2", "plain", "CRYPT-PLAIN-plain")
    fake_dm(tmp_path, "dm-3", "old", "CRYPT-LUKS1-bbbb-old")
    (tmp_path / "vda").mkdir()
    (tmp_path / "dm-4").mkdir()  # no dm/ directory: skipped
    assert mappings.luks_mappings(str(tmp_path)) == {
        "root": "CRYPT-LUKS2-aaaa-root",
        "old": "CRYPT-LUKS1-bbbb-old",
    }
    assert mappings.luks_mappings(str(tmp_path / "absent")) == {}


def link(sys_block: Path, upper: str, lower: str) -> None:
    (sys_block / upper / "slaves").mkdir(exist_ok=True)
    (sys_block / upper / "slaves" / lower).symlink_to(f"../../{lower}")


def test_backing_present_follows_the_slaves_down(tmp_path: Path) -> None:
    # usb-home (LUKS) on usb-vg-lv (LVM) on usb (LUKS) on sdb1; root on vda2.
    for disk in ("sdb1", "vda2"):
        (tmp_path / disk).mkdir()
        (tmp_path / disk / "dev").write_text("8:17\n")
    fake_dm(tmp_path, "dm-0", "usb", "CRYPT-LUKS2-aaaa-usb")
    fake_dm(tmp_path, "dm-1", "usb-vg-lv", "LVM-x")
    fake_dm(tmp_path, "dm-2", "usb-home", "CRYPT-LUKS2-bbbb-usb-home")
    fake_dm(tmp_path, "dm-3", "root", "CRYPT-LUKS2-cccc-root")
    for dm in ("dm-0", "dm-1", "dm-2", "dm-3"):
        (tmp_path / dm / "dev").write_text("253:0\n")
    link(tmp_path, "dm-0", "sdb1")
    link(tmp_path, "dm-1", "dm-0")
    link(tmp_path, "dm-2", "dm-1")
    link(tmp_path, "dm-3", "vda2")
    present = [n for n in ("usb", "usb-home", "root") if mappings.backing_present(n, str(tmp_path))]
    assert present == ["usb", "usb-home", "root"]
    # The stick is pulled: its partition leaves sysfs, the links dangle.
    (tmp_path / "sdb1" / "dev").unlink()
    (tmp_path / "sdb1").rmdir()
    assert not mappings.backing_present("usb", str(tmp_path))
    assert not mappings.backing_present("usb-home", str(tmp_path))
    assert mappings.backing_present("root", str(tmp_path))
    # Or the kernel drops the link itself: a mapping over nothing.
    (tmp_path / "dm-3" / "slaves" / "vda2").unlink()
    assert not mappings.backing_present("root", str(tmp_path))
    assert not mappings.backing_present("no-such-mapping", str(tmp_path))


def test_a_pci_disk_that_answers_all_ones_is_gone(tmp_path: Path) -> None:
    # sysfs as the kernel lays it out: the disk under its PCI function.
    pci = tmp_path / "devices" / "pci0000:00" / "0000:00:06.0"
    disk = pci / "virtio3" / "block" / "vdc"
    disk.mkdir(parents=True)
    (disk / "dev").write_text("252:32\n")
    (pci / "vendor").write_text("0x1af4\n")
    (pci / "config").write_bytes(b"\xf4\x1a\x01\x10" + bytes(60))
    block = tmp_path / "block"
    block.mkdir()
    (block / "vdc").symlink_to(disk)
    fake_dm(block, "dm-0", "stick", "CRYPT-LUKS2-aaaa-stick")
    link(block, "dm-0", "vdc")
    assert mappings.backing_present("stick", str(block))
    (pci / "config").write_bytes(b"\xff" * 64)  # removed while asleep, never told
    assert not mappings.backing_present("stick", str(block))
