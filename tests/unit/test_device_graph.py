"""The dependency graph on the layouts laptops have, built from fake sysfs trees: stacking,
loop devices over files, keyfile chains, detached headers, and devices that have nothing to
do with each other."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptlockd.daemon.device_graph import Wants, build_graph, resume_order, suspend_order
from cryptlockd.daemon.devices import (
    BlockNode,
    LuksDevice,
    discover_devices,
)
from cryptlockd.daemon.devices import resume_order as resume_devices
from cryptlockd.daemon.devices import suspend_order as suspend_devices
from tests.fakesys import UUID_A, UUID_B, UUID_C, FakeSystem

UUID_D = "dddddddd-1111-4222-8333-444444444444"


@pytest.fixture
def fs(tmp_path: Path) -> FakeSystem:
    return FakeSystem(tmp_path)


def found(fs: FakeSystem) -> dict[str, LuksDevice]:
    return {d.name: d for d in discover_devices(fs.paths)}


def orders(fs: FakeSystem) -> tuple[list[str], list[str]]:
    devs = discover_devices(fs.paths)
    return [d.name for d in suspend_devices(devs)], [d.name for d in resume_devices(devs)]


def luks_on_lvm_on_luks(fs: FakeSystem) -> None:
    """vda2 -> lower (LUKS) -> vg-lv (LVM) -> upper (LUKS) -> /."""
    fs.disk("vda", partitions=2)
    fs.luks("dm-0", "lower", UUID_A, ["vda2"])
    fs.lv("dm-1", "vg", "lv", ["dm-0"])
    fs.luks("dm-2", "upper", UUID_B, ["dm-1"])
    fs.mount("/", "dm-2", "/dev/mapper/upper")
    fs.mount("/boot", "vda1", "/dev/vda1")


def test_luks_on_lvm_on_luks(fs: FakeSystem) -> None:
    luks_on_lvm_on_luks(fs)
    fs.write_crypttab(f"lower UUID={UUID_A} none luks\nupper /dev/vg/lv none luks\n")
    d = found(fs)
    assert d["upper"].needs == ("lower",) and d["lower"].needs == ()
    assert d["upper"].essential and d["lower"].essential
    assert orders(fs) == (["upper", "lower"], ["lower", "upper"])


def test_passphrase_device_on_a_keyfile_device(fs: FakeSystem) -> None:
    # The lower device's keyfile is on the unencrypted /boot; the upper one asks.
    luks_on_lvm_on_luks(fs)
    fs.write_crypttab(f"lower UUID={UUID_A} /boot/lower.key luks\nupper /dev/vg/lv none luks\n")
    d = found(fs)
    assert d["lower"].key_source == "keyfile:/boot/lower.key" and d["lower"].keyfile_usable
    assert d["lower"].needs == () and d["upper"].needs == ("lower",)
    assert orders(fs)[1] == ["lower", "upper"]


def keyfile_chain(fs: FakeSystem) -> None:
    """root (passphrase, /) -> data (keyfile on /, /srv) -> archive (keyfile on /srv)."""
    fs.disk("vda", partitions=2)
    fs.disk("vdb")
    fs.disk("vdc")
    fs.luks("dm-0", "root", UUID_A, ["vda2"])
    fs.luks("dm-1", "data", UUID_B, ["vdb"])
    fs.luks("dm-2", "archive", UUID_C, ["vdc"])
    fs.mount("/", "dm-0", "/dev/mapper/root")
    fs.mount("/srv", "dm-1", "/dev/mapper/data")
    fs.mount("/srv/archive", "dm-2", "/dev/mapper/archive")
    fs.write_crypttab(
        f"root UUID={UUID_A} none luks\n"
        f"archive UUID={UUID_C} /srv/keys/archive.key luks\n"
        f"data UUID={UUID_B} /etc/keys/data.key luks\n"
    )


def test_keyfile_chain(fs: FakeSystem) -> None:
    keyfile_chain(fs)
    d = found(fs)
    assert d["data"].needs == ("root",)
    assert d["archive"].needs == ("data", "root")
    # The names alone would give archive, data, root.
    assert orders(fs) == (["archive", "data", "root"], ["root", "data", "archive"])
    assert [n for n, x in d.items() if x.essential] == ["root"]


def test_loop_device_backed_by_a_file_on_the_encrypted_root(fs: FakeSystem) -> None:
    # A systemd-homed style image: /home/alice.home on root, LUKS2 inside, on loop0.
    fs.disk("vda", partitions=2)
    fs.luks("dm-0", "root", UUID_A, ["vda2"])
    fs.mount("/", "dm-0", "/dev/mapper/root")
    fs.loop("loop0", "/home/alice.home")
    fs.luks("dm-1", "home-alice", UUID_B, ["loop0"])
    fs.mount("/home/alice", "dm-1", "/dev/mapper/home-alice")
    d = found(fs)
    assert d["home-alice"].needs == ("root",)
    assert d["home-alice"].backing_device == "/dev/loop0"
    # Suspended before root (its flush goes through root), resumed after it; the names
    # alone would put home-alice after root.
    assert orders(fs) == (["home-alice", "root"], ["root", "home-alice"])
    assert not d["home-alice"].essential and d["root"].essential


def test_loop_over_a_deleted_file_still_counts(fs: FakeSystem) -> None:
    fs.disk("vda", partitions=2)
    fs.luks("dm-0", "root", UUID_A, ["vda2"])
    fs.mount("/", "dm-0", "/dev/mapper/root")
    fs.loop("loop3", "/var/tmp/img (deleted)")
    fs.luks("dm-1", "a-img", UUID_B, ["loop3"])
    assert found(fs)["a-img"].needs == ("root",)


def test_detached_header_on_root(fs: FakeSystem) -> None:
    fs.disk("vda", partitions=2)
    fs.disk("vdb")
    fs.luks("dm-0", "root", UUID_A, ["vda2"])
    fs.luks("dm-1", "bare", UUID_B, ["vdb"])
    fs.mount("/", "dm-0", "/dev/mapper/root")
    fs.mount("/var", "dm-1", "/dev/mapper/bare")
    fs.write_crypttab(
        f"root UUID={UUID_A} none luks\nbare /dev/vdb none luks,header=/etc/hdr/bare.img\n"
    )
    d = found(fs)
    assert d["bare"].header == "/etc/hdr/bare.img" and d["bare"].needs == ("root",)
    assert orders(fs) == (["bare", "root"], ["root", "bare"])
    # /var is on bare, and bare's header on root: both essential.
    assert d["bare"].essential and d["root"].essential


def test_detached_header_on_a_plain_device_adds_nothing(fs: FakeSystem) -> None:
    fs.disk("vda", partitions=2)
    fs.disk("vdb")
    fs.luks("dm-0", "root", UUID_A, ["vda2"])
    fs.luks("dm-1", "bare", UUID_B, ["vdb"])
    fs.mount("/", "dm-0", "/dev/mapper/root")
    fs.write_crypttab(f"root UUID={UUID_A} none luks\nbare /dev/vdb none header=/dev/vda1\n")
    assert found(fs)["bare"].needs == ()


def test_unrelated_devices_need_nothing_and_are_not_essential(fs: FakeSystem) -> None:
    # root, plus a USB disk the desktop opened (luks-<uuid>, no crypttab line) and a LUKS1
    # disk with nothing mounted.
    fs.disk("vda", partitions=2)
    fs.disk("sdb", partitions=1)
    fs.disk("sdc")
    fs.luks("dm-0", "root", UUID_A, ["vda2"])
    fs.luks("dm-1", f"luks-{UUID_B}", UUID_B, ["sdb1"])
    fs.luks("dm-2", "old", UUID_C, ["sdc"], version=1)
    fs.mount("/", "dm-0", "/dev/mapper/root")
    fs.mount("/media/usb", "dm-1", f"/dev/mapper/luks-{UUID_B}")
    fs.write_crypttab(f"root UUID={UUID_A} none luks\n")
    d = found(fs)
    assert all(x.needs == () for x in d.values())
    assert [n for n, x in d.items() if x.essential] == ["root"]
    assert d["old"].luks_type == "LUKS1"


def test_luks2_with_integrity_below(fs: FakeSystem) -> None:
    # cryptsetup --integrity: dm-crypt on a dm-integrity subdevice ("<name>_dif").
    fs.disk("vda", partitions=2)
    fs.dm("dm-0", "root_dif", "CRYPT-SUBDEV-" + UUID_A.replace("-", "") + "-root_dif", ["vda2"])
    fs.luks("dm-1", "root", UUID_A, ["dm-0"])
    fs.mount("/", "dm-1", "/dev/mapper/root")
    d = found(fs)
    assert list(d) == ["root"] and d["root"].holds_root and d["root"].essential
    assert d["root"].backing_device == "/dev/vda2"


def test_a_keyfile_on_the_device_itself_cannot_be_used(fs: FakeSystem) -> None:
    keyfile_chain(fs)
    fs.write_crypttab(
        f"root UUID={UUID_A} none luks\n"
        f"data UUID={UUID_B} /srv/self.key luks\n"
        f"archive UUID={UUID_C} /srv/keys/archive.key luks\n"
    )
    d = found(fs)
    assert not d["data"].keyfile_usable and d["archive"].keyfile_usable
    assert d["data"].needs == () and d["archive"].needs == ("data",)


def test_a_keyfile_behind_the_device_cannot_be_used(fs: FakeSystem) -> None:
    # upper's keyfile sits on upper's own root, through lower: a cycle.
    luks_on_lvm_on_luks(fs)
    fs.write_crypttab(f"lower UUID={UUID_A} none luks\nupper /dev/vg/lv /etc/up.key luks\n")
    assert not found(fs)["upper"].keyfile_usable


def test_without_mountinfo_a_keyfile_device_comes_after_the_others(fs: FakeSystem) -> None:
    keyfile_chain(fs)
    fs.mountinfo.unlink()
    d = found(fs)
    assert d["data"].needs == ("root",) and d["archive"].needs == ("root",)
    assert all(x.essential and x.keyfile_usable for n, x in d.items())


def test_swap_on_a_keyfile_device_makes_the_keyfile_holder_essential(fs: FakeSystem) -> None:
    keyfile_chain(fs)
    fs.disk("vdd")
    fs.luks("dm-3", "swap", UUID_D, ["vdd"])
    (fs.root / "swaps").write_text(
        "Filename\tType\tSize\tUsed\tPriority\n/dev/dm-3 partition 1 0 -2\n"
    )
    fs.write_crypttab(
        f"root UUID={UUID_A} none luks\n"
        f"data UUID={UUID_B} /etc/keys/data.key luks\n"
        f"archive UUID={UUID_C} /srv/keys/archive.key luks\n"
        f"swap UUID={UUID_D} /srv/keys/swap.key luks\n"
    )
    d = found(fs)
    assert sorted(n for n, x in d.items() if x.essential) == ["data", "root", "swap"]


def test_everything_at_once(fs: FakeSystem) -> None:
    # LUKS on LVM on LUKS for /, a keyfile chain off it, a loop image on root, a detached
    # header on the data disk, and an unrelated USB disk.
    luks_on_lvm_on_luks(fs)
    fs.disk("vdb")
    fs.disk("vdc")
    fs.disk("sdx")
    fs.luks("dm-3", "data", UUID_C, ["vdb"])
    fs.mount("/srv", "dm-3", "/dev/mapper/data")
    fs.luks("dm-4", "archive", UUID_D, ["vdc"])
    fs.loop("loop0", "/var/lib/images/vm.img")
    fs.luks("dm-5", "vm", "eeeeeeee-1111-4222-8333-444444444444", ["loop0"])
    fs.luks("dm-6", "usb", "ffffffff-1111-4222-8333-444444444444", ["sdx"])
    fs.write_crypttab(
        f"lower UUID={UUID_A} none luks\n"
        "upper /dev/vg/lv none luks\n"
        f"data UUID={UUID_C} /etc/keys/data.key luks,header=/etc/hdr/data\n"
        f"archive UUID={UUID_D} /srv/archive.key luks\n"
    )
    suspend, resume = orders(fs)
    for later, earlier in [
        ("upper", "lower"),
        ("data", "upper"),
        ("archive", "data"),
        ("vm", "upper"),
    ]:
        assert resume.index(earlier) < resume.index(later), (earlier, later)
        assert suspend.index(later) < suspend.index(earlier), (earlier, later)
    d = found(fs)
    assert d["archive"].needs == ("data", "lower", "upper")
    assert d["usb"].needs == () and not d["usb"].essential


# ---- the graph on its own --------------------------------------------------------------


def test_graph_from_nodes_without_sysfs() -> None:
    nodes = {
        "sda": BlockNode("sda", "8:0"),
        "dm-0": BlockNode("dm-0", "253:0", slaves=("sda",)),
        "loop0": BlockNode("loop0", "7:0", backing_file="/img"),
        "dm-1": BlockNode("dm-1", "253:1", slaves=("loop0",)),
    }
    g = build_graph(
        nodes,
        [Wants("a", "dm-0"), Wants("b", "dm-1")],
        lambda path: "dm-0" if path == "/img" else None,
        ["dm-1"],
    )
    assert g.needs == {"a": frozenset(), "b": frozenset({"a"})}
    assert g.essential == frozenset({"a", "b"})


def test_orders_are_stable_and_cycles_do_not_loop() -> None:
    needs = {"a": ["c"], "b": [], "c": [], "x": ["y"], "y": ["x"]}
    items = sorted(needs)
    assert resume_order(items, str, needs.__getitem__) == ["b", "c", "a", "x", "y"]
    assert suspend_order(items, str, needs.__getitem__) == ["a", "b", "c", "x", "y"]
