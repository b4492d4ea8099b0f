"""Device discovery on fake sysfs trees shaped like the kernel's, and the stacking order."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from cryptlockd.daemon.devices import (
    LuksDevice,
    apply_exclude,
    discover_devices,
    parse_dm_uuid,
    read_block_nodes,
    resume_order,
    suspend_order,
)
from tests.fakesys import (
    UUID_A,
    UUID_B,
    UUID_C,
    FakeSystem,
    lvm_on_luks,
    plain_luks2,
    two_disks_keyfile,
)


@pytest.fixture
def fs(tmp_path: Path) -> FakeSystem:
    return FakeSystem(tmp_path)


def by_name(devices: list[LuksDevice]) -> dict[str, LuksDevice]:
    return {d.name: d for d in devices}


def test_plain_luks2(fs: FakeSystem) -> None:
    plain_luks2(fs)
    assert discover_devices(fs.paths) == [
        LuksDevice(
            name="cryptroot",
            uuid=UUID_A,
            luks_type="LUKS2",
            backing_device="/dev/vda2",
            holds_root=True,
            suspended=False,
            key_source="passphrase",
            holders=(),
            mounts=("/",),
        )
    ]


def test_lvm_on_luks(fs: FakeSystem) -> None:
    lvm_on_luks(fs)
    [dev] = discover_devices(fs.paths)
    assert dev.name == "nvme0n1p3_crypt"
    assert dev.backing_device == "/dev/nvme0n1p3"
    assert dev.holders == ("vg0-root", "vg0-swap", "vg0-home")
    assert dev.holds_root is True  # through the vg0-root LV
    # The prompt names the disk by what is mounted on its LVs.
    assert dev.mounts == ("/", "/home")


def test_two_disks_one_keyfile(fs: FakeSystem) -> None:
    two_disks_keyfile(fs)
    devs = by_name(discover_devices(fs.paths))
    assert sorted(devs) == ["cryptdata", "cryptroot"]
    assert devs["cryptroot"].key_source == "passphrase"
    assert devs["cryptroot"].holds_root is True
    assert devs["cryptroot"].backing_device == "/dev/vda2"
    assert devs["cryptdata"].key_source == "keyfile:/etc/keys/data.key"
    assert devs["cryptdata"].holds_root is False
    assert devs["cryptdata"].backing_device == "/dev/vdb"
    assert devs["cryptdata"].uuid == UUID_B


def test_keyfile_size_and_offset_from_crypttab(fs: FakeSystem) -> None:
    two_disks_keyfile(fs)
    fs.write_crypttab(
        f"cryptroot UUID={UUID_A} none luks\n"
        f"cryptdata UUID={UUID_B} /etc/keys/data.key "
        "luks,keyfile-size=64,keyfile-offset=512\n"
    )
    devs = by_name(discover_devices(fs.paths))
    assert (devs["cryptdata"].keyfile_size, devs["cryptdata"].keyfile_offset) == (64, 512)
    assert (devs["cryptroot"].keyfile_size, devs["cryptroot"].keyfile_offset) == (0, 0)


def test_luks1(fs: FakeSystem) -> None:
    fs.disk("sda", partitions=1)
    fs.luks("dm-0", "legacy", UUID_C, ["sda1"], version=1)
    [dev] = discover_devices(fs.paths)
    assert (dev.name, dev.luks_type, dev.uuid) == ("legacy", "LUKS1", UUID_C)
    assert dev.holds_root is False  # nothing mounted on /


def test_non_luks_dm_devices_are_ignored(fs: FakeSystem) -> None:
    fs.disk("vda", partitions=4)
    fs.dm("dm-0", "cryptswap", "CRYPT-PLAIN-cryptswap", ["vda1"])
    fs.lv("dm-1", "vg1", "data", ["vda2"])
    fs.dm("dm-2", "tc", "CRYPT-TCRYPT-tc", ["vda3"])
    fs.dm("dm-3", "integ_dif", "CRYPT-SUBDEV-" + "ab" * 16 + "-integ_dif", ["vda4"])
    fs.dm("dm-4", "mpatha", "mpath-3600508b4000156d700012000000b0000", ["vda4"])
    assert discover_devices(fs.paths) == []


def test_luks_among_non_luks(fs: FakeSystem) -> None:
    plain_luks2(fs)
    fs.disk("vdb", partitions=1)
    fs.dm("dm-1", "cryptswap", "CRYPT-PLAIN-cryptswap", ["vdb1"])
    assert [d.name for d in discover_devices(fs.paths)] == ["cryptroot"]


def test_root_not_on_luks(fs: FakeSystem) -> None:
    fs.disk("vda", partitions=2)
    fs.luks("dm-0", "cryptdata", UUID_A, ["vda2"])
    fs.mount("/", "vda1", "/dev/vda1")
    fs.mount("/data", "dm-0", "/dev/mapper/cryptdata")
    [dev] = discover_devices(fs.paths)
    assert dev.holds_root is False


def test_root_on_btrfs_found_through_the_mount_source(fs: FakeSystem) -> None:
    # btrfs reports an anonymous device number (0:NN), so only the source names the device.
    fs.disk("vda", partitions=2)
    fs.luks("dm-0", "luks-" + UUID_A, UUID_A, ["vda2"])
    fs.mount("/", "0:33", f"/dev/mapper/luks-{UUID_A}", fstype="btrfs")
    [dev] = discover_devices(fs.paths)
    assert dev.holds_root is True


def test_root_on_btrfs_over_lvm_over_luks(fs: FakeSystem) -> None:
    fs.disk("vda", partitions=2)
    fs.luks("dm-0", "cryptpv", UUID_A, ["vda2"])
    fs.lv("dm-1", "vg", "root", ["dm-0"])
    fs.mount("/", "0:40", "/dev/dm-1", fstype="btrfs")
    [dev] = discover_devices(fs.paths)
    assert dev.holds_root is True


def test_overmounted_root_uses_the_top_entry(fs: FakeSystem) -> None:
    fs.disk("vda", partitions=2)
    fs.luks("dm-0", "cryptroot", UUID_A, ["vda2"])
    fs.mount("/", "vda1", "/dev/vda1")
    fs.mount("/", "dm-0", "/dev/mapper/cryptroot")
    assert discover_devices(fs.paths)[0].holds_root is True


def test_luks_on_lvm_backing_is_the_physical_volume(fs: FakeSystem) -> None:
    fs.disk("sdb")
    fs.lv("dm-0", "vgdata", "secret", ["sdb"])
    fs.luks("dm-1", "secret_crypt", UUID_B, ["dm-0"])
    [dev] = discover_devices(fs.paths)
    assert dev.backing_device == "/dev/sdb"
    assert dev.holders == ()


def test_suspended_flag(fs: FakeSystem) -> None:
    two_disks_keyfile(fs)
    fs.set_suspended("dm-1", True)
    devs = by_name(discover_devices(fs.paths))
    assert devs["cryptdata"].suspended is True
    assert devs["cryptroot"].suspended is False


def test_device_not_in_crypttab_needs_a_passphrase(fs: FakeSystem) -> None:
    fs.disk("vda", partitions=2)
    fs.luks("dm-0", "manual", UUID_A, ["vda2"])
    assert discover_devices(fs.paths)[0].key_source == "passphrase"  # no crypttab at all


def test_hot_unplug_disappears(fs: FakeSystem) -> None:
    two_disks_keyfile(fs)
    fs.remove("dm-1")
    assert [d.name for d in discover_devices(fs.paths)] == ["cryptroot"]


def test_unreadable_mountinfo_still_discovers(fs: FakeSystem) -> None:
    plain_luks2(fs)
    fs.mountinfo.unlink()
    [dev] = discover_devices(fs.paths)
    assert dev.holds_root is False


def test_empty_sysfs(tmp_path: Path) -> None:
    fs = FakeSystem(tmp_path)
    assert discover_devices(fs.paths) == []


def test_parse_dm_uuid() -> None:
    assert parse_dm_uuid("CRYPT-LUKS2-" + UUID_A.replace("-", "") + "-root") == ("LUKS2", UUID_A)
    assert parse_dm_uuid("CRYPT-LUKS1-" + UUID_C.replace("-", "").upper() + "-x") == (
        "LUKS1",
        UUID_C,
    )
    assert parse_dm_uuid("CRYPT-PLAIN-swap") is None
    assert parse_dm_uuid("LVM-abc") is None
    assert parse_dm_uuid("CRYPT-LUKS3-" + "0" * 32 + "-x") is None
    assert parse_dm_uuid("") is None


def test_real_sysfs_is_readable() -> None:
    # The host has no device-mapper, but the reader must walk the real sysfs layout
    # (symlinked class/block entries) and agree with the kernel's /sys/dev/block index.
    nodes = read_block_nodes(Path("/sys"))
    if not nodes:
        pytest.skip("this host exposes no block devices in /sys/class/block")
    for node in nodes.values():
        assert os.path.exists(f"/sys/dev/block/{node.devno}"), node
    assert all(d.luks_type in ("LUKS1", "LUKS2") for d in discover_devices())


def dev(name: str, needs: tuple[str, ...] = (), key: str = "passphrase") -> LuksDevice:
    return LuksDevice(name, UUID_A, "LUKS2", "/dev/x", False, False, key, needs=needs)


def names(devices: list[LuksDevice]) -> list[str]:
    return [d.name for d in devices]


def test_order_of_independent_devices() -> None:
    devs = [dev("b"), dev("a"), dev("c", key="keyfile:/k")]
    assert names(suspend_order(devs)) == ["a", "b", "c"]


def test_order_of_stacked_luks() -> None:
    # outer (LUKS) on vg-lv (LVM) on inner (LUKS): outer needs inner.
    inner = dev("inner")
    outer = dev("outer", needs=("inner",))
    other = dev("aaa")
    assert names(suspend_order([inner, other, outer])) == ["aaa", "outer", "inner"]
    assert names(resume_order([inner, other, outer])) == ["aaa", "inner", "outer"]


def test_discovered_stack_order(fs: FakeSystem) -> None:
    fs.disk("vda", partitions=2)
    fs.luks("dm-0", "inner", UUID_A, ["vda2"])
    fs.lv("dm-1", "vg", "lv", ["dm-0"])
    fs.luks("dm-2", "outer", UUID_B, ["dm-1"])
    fs.mount("/", "dm-2", "/dev/mapper/outer")
    devs = discover_devices(fs.paths)
    d = by_name(devs)
    assert d["inner"].holders == ("vg-lv", "outer")
    assert d["inner"].holds_root is True and d["outer"].holds_root is True
    assert d["inner"].backing_device == "/dev/vda2"
    assert names(suspend_order(devs)) == ["outer", "inner"]


def test_order_survives_a_cycle() -> None:
    a = dev("a", needs=("b",))
    b = dev("b", needs=("a",))
    assert sorted(names(suspend_order([a, b]))) == ["a", "b"]


def test_apply_exclude() -> None:
    devs = [dev("a"), LuksDevice("b", UUID_B, "LUKS2", "/dev/y", False, False, "passphrase")]
    assert names(apply_exclude(devs, ["A"])) == ["b"]
    assert names(apply_exclude(devs, [UUID_B.upper()])) == ["a"]
    assert names(apply_exclude(devs, [])) == ["a", "b"]


# ---- essential devices (SPEC 2.8) ------------------------------------------------------


def test_root_and_its_keyfile_holder_are_essential_a_data_disk_is_not(fs: FakeSystem) -> None:
    two_disks_keyfile(fs)
    devs = by_name(discover_devices(fs.paths))
    assert devs["cryptroot"].essential and not devs["cryptdata"].essential


def test_a_keyfile_for_an_essential_device_makes_its_disk_essential(fs: FakeSystem) -> None:
    two_disks_keyfile(fs)
    fs.disk("vdc")
    fs.luks("dm-2", "cryptvar", UUID_C, ["vdc"])
    fs.mount("/var", "dm-2", "/dev/mapper/cryptvar")
    fs.write_crypttab(
        f"cryptroot UUID={UUID_A} none luks\n"
        f"cryptdata UUID={UUID_B} /etc/keys/data.key luks\n"
        f"cryptvar UUID={UUID_C} /srv/keys/var.key luks\n"
    )
    devs = by_name(discover_devices(fs.paths))
    assert devs["cryptvar"].essential
    assert devs["cryptdata"].essential  # /srv holds /var's keyfile


def test_a_keyfile_for_a_skippable_device_does_not_make_its_disk_essential(
    fs: FakeSystem,
) -> None:
    two_disks_keyfile(fs)
    fs.disk("vdc")
    fs.luks("dm-2", "cryptarchive", UUID_C, ["vdc"])
    fs.write_crypttab(
        f"cryptroot UUID={UUID_A} none luks\n"
        f"cryptdata UUID={UUID_B} /etc/keys/data.key luks\n"
        f"cryptarchive UUID={UUID_C} /srv/keys/archive.key luks\n"
    )
    devs = by_name(discover_devices(fs.paths))
    assert not devs["cryptdata"].essential and not devs["cryptarchive"].essential
    assert devs["cryptarchive"].needs == ("cryptdata", "cryptroot")


def test_var_and_swap_make_their_devices_essential(fs: FakeSystem) -> None:
    lvm_on_luks(fs)
    fs.disk("vdb")
    fs.luks("dm-4", "cryptvar", UUID_B, ["vdb"])
    fs.disk("vdc")
    fs.luks("dm-5", "cryptswap", UUID_C, ["vdc"])
    fs.mount("/var", "dm-4", "/dev/mapper/cryptvar")
    (fs.root / "swaps").write_text(
        "Filename\tType\tSize\tUsed\tPriority\n/dev/dm-5 partition 1048572 0 -2\n"
    )
    (fs.dev / "dm-5").touch()
    devs = by_name(discover_devices(fs.paths))
    assert devs["cryptvar"].essential and devs["cryptswap"].essential
    assert devs["nvme0n1p3_crypt"].essential  # through the vg0-root LV


def test_a_swap_file_makes_its_filesystem_essential(fs: FakeSystem) -> None:
    two_disks_keyfile(fs)
    (fs.root / "swaps").write_text(
        "Filename\tType\tSize\tUsed\tPriority\n/srv/swapfile file 1048572 0 -2\n"
    )
    assert by_name(discover_devices(fs.paths))["cryptdata"].essential


def test_without_mountinfo_every_device_is_essential(fs: FakeSystem) -> None:
    two_disks_keyfile(fs)
    fs.mountinfo.unlink()
    assert all(d.essential for d in discover_devices(fs.paths))
