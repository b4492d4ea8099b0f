"""Active LUKS devices: what sysfs, mountinfo and crypttab (crypttab.py) say about them, and
their order.

Reading (sysfs, /proc/self/mountinfo, /etc/crypttab) is kept apart from the pure logic that
turns what was read into `LuksDevice`s, so the logic is tested on fake trees and strings.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptlockd.daemon import device_graph
from cryptlockd.daemon.crypttab import CrypttabEntry, read_crypttab
from cryptlockd.daemon.mountinfo import (
    essential_filesystems,
    mount_of,
    parse_mountinfo_points,
    parse_mountinfo_root,
)

__all__ = [
    "BlockNode",
    "LuksDevice",
    "SystemPaths",
    "apply_exclude",
    "build_devices",
    "crypt_mappings",
    "discover_devices",
    "parse_dm_uuid",
    "read_block_nodes",
    "resume_order",
    "suspend_order",
]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LuksDevice:
    name: str  # dm name, e.g. "cryptroot"
    uuid: str  # LUKS header UUID
    luks_type: str  # "LUKS1" or "LUKS2"
    backing_device: str  # e.g. "/dev/vda2"
    holds_root: bool  # root fs sits on it, directly or through holders
    suspended: bool  # dm reports it suspended now
    key_source: str  # "passphrase" or "keyfile:<path>" (from crypttab)
    holders: tuple[str, ...] = ()  # dm names stacked on top (LVM LVs, ...)
    # crypttab's keyfile-size= and keyfile-offset=, in bytes; 0: the whole file.
    keyfile_size: int = 0
    keyfile_offset: int = 0
    # Holds /, /usr, /var or swap, or is needed by a device that does (lower layers,
    # keyfile, header; device_graph.py): nothing may be thawed while it is suspended.
    # True unless shown otherwise.
    essential: bool = True
    # dm names of the LUKS devices that must be back before this one (device_graph.py).
    needs: tuple[str, ...] = ()
    # crypttab's header=: a detached LUKS header, a path on the real root ("" for none).
    header: str = ""
    # False when the keyfile cannot be read at resume (it lives on the device itself or
    # behind it): the helper asks for the passphrase instead.
    keyfile_usable: bool = True
    # Where its file systems are mounted, directly or through layers above (LVM): the
    # resume prompt names the disk by them.
    mounts: tuple[str, ...] = ()


@dataclass(frozen=True)
class SystemPaths:
    sysfs: Path = Path("/sys")
    mountinfo: Path = Path("/proc/self/mountinfo")
    crypttab: Path = Path("/etc/crypttab")
    dev: Path = Path("/dev")
    swaps: Path = Path("/proc/swaps")


# ---- sysfs ---------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockNode:
    """One block device as sysfs describes it."""

    kname: str  # kernel name: "dm-0", "vda2"
    devno: str  # "253:0"
    dm_name: str | None = None
    dm_uuid: str | None = None
    suspended: bool = False
    slaves: tuple[str, ...] = ()  # knames below
    holders: tuple[str, ...] = ()  # knames above
    # A loop device's backing file (sysfs shows it no slave): where its data really lives.
    backing_file: str | None = None


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (FileNotFoundError, NotADirectoryError):
        return None


def _names(directory: Path) -> tuple[str, ...]:
    try:
        return tuple(sorted(p.name for p in directory.iterdir()))
    except (FileNotFoundError, NotADirectoryError):
        return ()


def _loop_backing_file(base: Path) -> str | None:
    name = _read(base / "loop" / "backing_file")
    if not name:
        return None
    # A file unlinked while attached still holds its file system's blocks.
    return name.removesuffix(" (deleted)")


def read_block_nodes(sysfs: Path) -> dict[str, BlockNode]:
    """Every block device (whole disks, partitions, dm) under <sysfs>/class/block."""
    nodes: dict[str, BlockNode] = {}
    for kname in _names(sysfs / "class" / "block"):
        base = sysfs / "class" / "block" / kname
        devno = _read(base / "dev")
        if devno is None:
            continue  # vanished while we looked: hotplug will tell us again
        dm_name = _read(base / "dm" / "name")
        nodes[kname] = BlockNode(
            kname=kname,
            devno=devno,
            dm_name=dm_name,
            dm_uuid=_read(base / "dm" / "uuid") if dm_name is not None else None,
            suspended=_read(base / "dm" / "suspended") == "1",
            slaves=_names(base / "slaves"),
            holders=_names(base / "holders"),
            backing_file=_loop_backing_file(base),
        )
    return nodes


_DM_UUID = re.compile(r"^CRYPT-(LUKS[12])-([0-9a-fA-F]+)-")


def parse_dm_uuid(dm_uuid: str) -> tuple[str, str] | None:
    """("LUKS2", "<uuid with dashes>") for a LUKS dm-crypt device, None for anything else.

    libcryptsetup names LUKS mappings CRYPT-LUKS<n>-<uuid without dashes>-<dm name>; plain
    dm-crypt (CRYPT-PLAIN-), other formats, LVM (LVM-) and integrity subdevices do not match.
    """
    m = _DM_UUID.match(dm_uuid)
    if m is None:
        return None
    hexid = m.group(2).lower()
    if len(hexid) == 32:
        uuid = f"{hexid[:8]}-{hexid[8:12]}-{hexid[12:16]}-{hexid[16:20]}-{hexid[20:]}"
    else:
        uuid = hexid
    return m.group(1), uuid


# libcryptsetup's dm UUIDs are CRYPT-<type>-...; these hold no volume key of their own
# (a LUKS2 integrity subdevice, a temporary device, dm-verity, keyless dm-integrity).
_KEYLESS_TYPES = ("SUBDEV", "TEMP", "VERITY", "INTEGRITY")


def crypt_mappings(nodes: dict[str, BlockNode]) -> dict[str, str]:
    """dm name -> type ("LUKS2", "PLAIN", "TCRYPT", "BITLK"...) of every dm-crypt mapping
    libcryptsetup made that holds a volume key in RAM."""
    out = {}
    for node in nodes.values():
        if node.dm_name is None or not (node.dm_uuid or "").startswith("CRYPT-"):
            continue
        kind = (node.dm_uuid or "").split("-")[1]
        if kind not in _KEYLESS_TYPES:
            out[node.dm_name] = kind
    return out


def _walk(
    nodes: dict[str, BlockNode], start: str, step: Callable[[BlockNode], Iterable[str]]
) -> list[str]:
    """Breadth-first knames reachable from `start` (excluded) through `step`."""
    seen: list[str] = []
    queue = [start]
    while queue:
        node = nodes.get(queue.pop(0))
        if node is None:
            continue
        for nxt in step(node):
            if nxt not in seen and nxt != start:
                seen.append(nxt)
                queue.append(nxt)
    return seen


def _backing_device(nodes: dict[str, BlockNode], kname: str) -> str:
    # Follow the slaves down to the first device that is not device-mapper: the partition
    # or disk that holds the LUKS header (or the lowest one, for LUKS on LVM).
    for below in _walk(nodes, kname, lambda n: n.slaves):
        node = nodes.get(below)
        if node is None or node.dm_name is None:
            return f"/dev/{below}"
    return ""


def _root_kname(nodes: dict[str, BlockNode], root: tuple[str, str] | None, dev: Path) -> str | None:
    if root is None:
        return None
    devno, source = root
    if devno and not devno.startswith("0:"):
        for node in nodes.values():
            if node.devno == devno:
                return node.kname
    # An anonymous device number (btrfs, for one): fall back to the mount source.
    if not source.startswith("/dev/"):
        return None
    rel = source[len("/dev/") :]
    candidate = dev / rel
    try:
        resolved = candidate.resolve(strict=True).name
    except OSError:
        resolved = None
    if resolved in nodes:
        return resolved
    if rel.startswith("mapper/"):
        for node in nodes.values():
            if node.dm_name == rel[len("mapper/") :]:
                return node.kname
    return rel if rel in nodes else None


def _locator(
    nodes: dict[str, BlockNode], points: dict[str, tuple[str, str]] | None, dev: Path
) -> device_graph.Locate:
    """Where a path lives (device_graph.Locate): a /dev node is that device; a file is on
    the file system of the longest mount point containing it."""

    def locate(path: str) -> str | None:
        if path.startswith("/dev/"):
            return _root_kname(nodes, ("", path), dev)
        if points is None:
            return None
        fs = mount_of(points, path)
        return _root_kname(nodes, fs, dev) if fs is not None else None

    return locate


def _mounts_by_kname(
    nodes: dict[str, BlockNode], points: dict[str, tuple[str, str]] | None, dev: Path
) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for point, fs in (points or {}).items():
        kname = _root_kname(nodes, fs, dev)
        if kname is not None:
            out.setdefault(kname, []).append(point)
    return out


def build_devices(
    nodes: dict[str, BlockNode],
    root: tuple[str, str] | None,
    crypttab: Sequence[CrypttabEntry],
    dev: Path = Path("/dev"),
    essential: Sequence[tuple[str, str]] | None = None,
    points: dict[str, tuple[str, str]] | None = None,
) -> list[LuksDevice]:
    """The LUKS devices among `nodes`, sorted by dm name. `essential`: what
    essential_filesystems() found; None (unknown): every device counts as essential.
    `points`: the mount table (parse_mountinfo_points), to find where keyfiles, headers
    and loop devices' backing files live; None: unknown."""
    entries = {e.name: e for e in crypttab}
    root_kname = _root_kname(nodes, root, dev)
    found: list[tuple[BlockNode, str, str]] = []
    for node in nodes.values():
        if node.dm_name is None or node.dm_uuid is None:
            continue
        parsed = parse_dm_uuid(node.dm_uuid)
        if parsed is not None:
            found.append((node, *parsed))
    locate = _locator(nodes, points, dev)
    wants = []
    for node, _, _ in found:
        assert node.dm_name is not None
        entry = entries.get(node.dm_name)
        wants.append(
            device_graph.Wants(
                node.dm_name,
                node.kname,
                entry.keyfile if entry else None,
                entry.header if entry else None,
            )
        )
    essential_knames = (
        None
        if essential is None
        else [k for fs in essential if (k := _root_kname(nodes, fs, dev)) is not None]
    )
    graph = device_graph.build_graph(nodes, wants, locate, essential_knames)
    mounted = _mounts_by_kname(nodes, points, dev)
    out: list[LuksDevice] = []
    for node, luks_type, uuid in found:
        assert node.dm_name is not None
        entry = entries.get(node.dm_name)
        above = _walk(nodes, node.kname, lambda n: n.holders)
        holders = tuple((nodes[k].dm_name or k) if k in nodes else k for k in above)
        out.append(
            LuksDevice(
                name=node.dm_name,
                uuid=uuid,
                luks_type=luks_type,
                backing_device=_backing_device(nodes, node.kname),
                holds_root=root_kname is not None
                and (root_kname == node.kname or root_kname in above),
                suspended=node.suspended,
                key_source=entry.key_source if entry else "passphrase",
                holders=holders,
                keyfile_size=entry.keyfile_size if entry else 0,
                keyfile_offset=entry.keyfile_offset if entry else 0,
                essential=graph.is_essential(node.dm_name),
                needs=tuple(sorted(graph.needs.get(node.dm_name, ()))),
                header=(entry.header or "") if entry else "",
                keyfile_usable=node.dm_name not in graph.keyfile_unusable,
                mounts=tuple(sorted({m for k in (node.kname, *above) for m in mounted.get(k, ())})),
            )
        )
    return sorted(out, key=lambda d: d.name)


def discover_devices(paths: SystemPaths = SystemPaths()) -> list[LuksDevice]:
    nodes = read_block_nodes(paths.sysfs)
    crypttab = read_crypttab(paths.crypttab)
    essential: list[tuple[str, str]] | None = None
    points: dict[str, tuple[str, str]] | None = None
    try:
        mountinfo = paths.mountinfo.read_text()
    except OSError as e:
        log.warning("cannot read %s: %s", paths.mountinfo, e)
        root = None
    else:
        root = parse_mountinfo_root(mountinfo)
        points = parse_mountinfo_points(mountinfo)
        try:
            swaps = paths.swaps.read_text()
        except FileNotFoundError:
            swaps = ""  # no swap support in the kernel, or a test tree without the file
        except OSError as e:
            log.warning("cannot read %s: %s", paths.swaps, e)
            swaps = None
        if swaps is not None:
            essential = essential_filesystems(mountinfo, swaps)
    return build_devices(nodes, root, crypttab, paths.dev, essential, points)


def apply_exclude(devices: Iterable[LuksDevice], exclude: Iterable[str]) -> list[LuksDevice]:
    """Drop the devices named in the config's devices.exclude (by dm name or LUKS UUID)."""
    skip = {e.lower() for e in exclude}
    return [d for d in devices if d.name.lower() not in skip and d.uuid.lower() not in skip]


def suspend_order(devices: Sequence[LuksDevice]) -> list[LuksDevice]:
    """Whatever needs another device first (device_graph.py): upper layers, loop-backed
    images, devices whose keyfile or header lives on another."""
    return device_graph.suspend_order(devices, lambda d: d.name, lambda d: d.needs)


def resume_order(devices: Sequence[LuksDevice]) -> list[LuksDevice]:
    """What is needed first: the reverse of suspend_order's relation."""
    return device_graph.resume_order(devices, lambda d: d.name, lambda d: d.needs)
