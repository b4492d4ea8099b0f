"""Fake sysfs / mountinfo / crypttab / dev trees in a temp dir, shaped like the real ones.

Used by the unit tests of cryptlockd.daemon.devices and by the daemon integration tests
(`--sysfs`, `--mountinfo`, `--crypttab`). Layout, as on a real kernel:

  sys/class/block/<kname>/dev                  "major:minor"
  sys/class/block/<kname>/dm/{name,uuid,suspended}
  sys/class/block/<kname>/slaves/<kname below>  -> ../../<kname below>
  sys/class/block/<kname>/holders/<kname above> -> ../../<kname above>
  dev/<kname>, dev/mapper/<dm name> -> ../<kname>
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from cryptlockd.daemon.devices import SystemPaths

# Mountinfo entries that are on every system and must not confuse root detection.
_BASE_MOUNTS = [
    "22 1 0:21 / /proc rw,relatime - proc proc rw",
    "23 1 0:22 / /sys rw,relatime - sysfs sysfs rw",
    "24 1 0:6 / /dev rw,relatime - devtmpfs udev rw,mode=755",
]


def luks_dm_uuid(uuid: str, name: str, version: int = 2) -> str:
    return f"CRYPT-LUKS{version}-{uuid.replace('-', '')}-{name}"


class FakeSystem:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.sysfs = root / "sys"
        self.block = self.sysfs / "class" / "block"
        self.dev = root / "dev"
        self.mountinfo = root / "mountinfo"
        self.crypttab = root / "crypttab"
        self.block.mkdir(parents=True, exist_ok=True)
        (self.dev / "mapper").mkdir(parents=True, exist_ok=True)
        self._mounts = list(_BASE_MOUNTS)
        self.mountinfo.write_text("\n".join(self._mounts) + "\n")
        self._next_minor: dict[int, int] = {}

    @property
    def paths(self) -> SystemPaths:
        return SystemPaths(
            sysfs=self.sysfs,
            mountinfo=self.mountinfo,
            crypttab=self.crypttab,
            dev=self.dev,
            swaps=self.root / "swaps",
        )

    def daemon_args(self) -> list[str]:
        return [
            "--sysfs",
            str(self.sysfs),
            "--mountinfo",
            str(self.mountinfo),
            "--crypttab",
            str(self.crypttab),
            "--dev",
            str(self.dev),
        ]

    def _devno(self, major: int) -> str:
        minor = self._next_minor.get(major, 0)
        self._next_minor[major] = minor + 1
        return f"{major}:{minor}"

    def _node(self, kname: str, major: int) -> Path:
        base = self.block / kname
        base.mkdir()
        devno = self._devno(major)
        (base / "dev").write_text(devno + "\n")
        (base / "holders").mkdir()
        (self.dev / kname).write_text("")
        return base

    def devno(self, kname: str) -> str:
        return (self.block / kname / "dev").read_text().strip()

    def disk(self, kname: str, partitions: int = 0) -> list[str]:
        """A whole disk and its partitions (vda, vda1, vda2...); returns their knames."""
        base = self._node(kname, 252)
        (base / "slaves").mkdir()
        names = [kname]
        for i in range(1, partitions + 1):
            part = f"{kname}p{i}" if kname[-1].isdigit() else f"{kname}{i}"
            self._node(part, 252)
            (self.block / part / "partition").write_text(f"{i}\n")
            names.append(part)
        return names

    def loop(self, kname: str, backing_file: str) -> str:
        """A loop device (no slaves in sysfs) over `backing_file`."""
        base = self._node(kname, 7)
        (base / "slaves").mkdir()
        (base / "loop").mkdir()
        (base / "loop" / "backing_file").write_text(backing_file + "\n")
        return kname

    def dm(
        self, kname: str, name: str, uuid: str, slaves: list[str], suspended: bool = False
    ) -> str:
        base = self._node(kname, 253)
        (base / "dm").mkdir()
        (base / "dm" / "name").write_text(name + "\n")
        (base / "dm" / "uuid").write_text(uuid + "\n")
        (base / "dm" / "suspended").write_text(("1" if suspended else "0") + "\n")
        (base / "slaves").mkdir()
        for s in slaves:
            os.symlink(f"../../{s}", base / "slaves" / s)
            os.symlink(f"../../{kname}", self.block / s / "holders" / kname)
        os.symlink(f"../{kname}", self.dev / "mapper" / name)
        return kname

    def luks(
        self,
        kname: str,
        name: str,
        uuid: str,
        slaves: list[str],
        version: int = 2,
        suspended: bool = False,
    ) -> str:
        return self.dm(kname, name, luks_dm_uuid(uuid, name, version), slaves, suspended)

    def lv(self, kname: str, vg: str, lv: str, slaves: list[str]) -> str:
        # LVM's dm uuid: "LVM-" + VG uuid + LV uuid, no dashes.
        return self.dm(kname, f"{vg}-{lv}", "LVM-" + "a1" * 32, slaves)

    def remove(self, kname: str) -> None:
        """The device goes away, as on hot-unplug."""
        import shutil

        base = self.block / kname
        for s in os.listdir(base / "slaves") if (base / "slaves").exists() else []:
            (self.block / s / "holders" / kname).unlink()
        name_file = base / "dm" / "name"
        if name_file.exists():
            (self.dev / "mapper" / name_file.read_text().strip()).unlink()
        shutil.rmtree(base)
        (self.dev / kname).unlink()

    def set_suspended(self, kname: str, suspended: bool) -> None:
        (self.block / kname / "dm" / "suspended").write_text("1\n" if suspended else "0\n")

    def mount(
        self, mountpoint: str, kname_or_devno: str, source: str, fstype: str = "ext4"
    ) -> None:
        devno = kname_or_devno if ":" in kname_or_devno else self.devno(kname_or_devno)
        mid = 100 + len(self._mounts)
        self._mounts.append(
            f"{mid} 1 {devno} / {mountpoint} rw,relatime shared:1 - {fstype} {source} rw"
        )
        self.mountinfo.write_text("\n".join(self._mounts) + "\n")

    def write_crypttab(self, text: str) -> None:
        self.crypttab.write_text(text)


UUID_A = "11111111-2222-4333-8444-555555555555"
UUID_B = "aaaaaaaa-bbbb-4ccc-8ddd-eeeeeeeeeeee"
UUID_C = "01234567-89ab-4cde-8f01-23456789abcd"


def plain_luks2(fs: FakeSystem) -> None:
    """vda2 -> cryptroot (LUKS2) -> / (ext4)."""
    fs.disk("vda", partitions=2)
    fs.luks("dm-0", "cryptroot", UUID_A, ["vda2"])
    fs.mount("/boot", "vda1", "/dev/vda1")
    fs.mount("/", "dm-0", "/dev/mapper/cryptroot")
    fs.write_crypttab(f"cryptroot UUID={UUID_A} none luks,discard\n")


def lvm_on_luks(fs: FakeSystem) -> None:
    """nvme0n1p3 -> nvme0n1p3_crypt (LUKS2) -> LVs vg0-root (/), vg0-swap, vg0-home."""
    fs.disk("nvme0n1", partitions=3)
    fs.luks("dm-0", "nvme0n1p3_crypt", UUID_A, ["nvme0n1p3"])
    fs.lv("dm-1", "vg0", "root", ["dm-0"])
    fs.lv("dm-2", "vg0", "swap", ["dm-0"])
    fs.lv("dm-3", "vg0", "home", ["dm-0"])
    fs.mount("/", "dm-1", "/dev/mapper/vg0-root")
    fs.mount("/home", "dm-3", "/dev/mapper/vg0-home")
    fs.write_crypttab(f"nvme0n1p3_crypt UUID={UUID_A} none luks,discard\n")


def two_disks_keyfile(fs: FakeSystem) -> None:
    """vda2 -> cryptroot (/, passphrase); vdb -> cryptdata (keyfile on the root fs)."""
    fs.disk("vda", partitions=2)
    fs.disk("vdb")
    fs.luks("dm-0", "cryptroot", UUID_A, ["vda2"])
    fs.luks("dm-1", "cryptdata", UUID_B, ["vdb"])
    fs.mount("/", "dm-0", "/dev/mapper/cryptroot")
    fs.mount("/srv", "dm-1", "/dev/mapper/cryptdata")
    fs.write_crypttab(
        "# <name> <device> <key file> <options>\n"
        f"cryptroot  UUID={UUID_A}  none  luks\n"
        f"cryptdata  UUID={UUID_B}  /etc/keys/data.key  luks,nofail\n"
    )


# What the daemon reports of the devices these layouts build: Devices property structs,
# fields in the order of cryptlockd.defs.DEVICE_FIELDS.
CRYPTROOT_ON_VDA2 = ["cryptroot", UUID_A, "LUKS2", "/dev/vda2", True, False, "passphrase", []]
CRYPTDATA_ON_VDB = [
    "cryptdata",
    UUID_B,
    "LUKS2",
    "/dev/vdb",
    False,
    False,
    "keyfile:/etc/keys/data.key",
    [],
]

# Each layout, and its Devices property (sorted by dm name).
LAYOUTS: dict[str, tuple[Callable[[FakeSystem], None], list[list[object]]]] = {
    "plain_luks2": (plain_luks2, [CRYPTROOT_ON_VDA2]),
    "lvm_on_luks": (
        lvm_on_luks,
        [
            [
                "nvme0n1p3_crypt",
                UUID_A,
                "LUKS2",
                "/dev/nvme0n1p3",
                True,
                False,
                "passphrase",
                ["vg0-root", "vg0-swap", "vg0-home"],
            ]
        ],
    ),
    "two_disks_keyfile": (two_disks_keyfile, [CRYPTDATA_ON_VDB, CRYPTROOT_ON_VDA2]),
}
