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

from cryptlockd.daemon.crypttab import CrypttabEntry, read_crypttab

__all__ = [
    "BlockNode",
    "LuksDevice",
    "SystemPaths",
    "apply_exclude",
    "build_devices",
    "discover_devices",
    "parse_dm_uuid",
    "parse_mountinfo_root",
    "read_block_nodes",
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
    # Holds /, /usr, /var, swap or a keyfile, directly or through holders (SPEC 2.8):
    # nothing may be thawed while it is suspended. True unless shown otherwise.
    essential: bool = True


@dataclass(frozen=True)
class SystemPaths:
    sysfs: Path = Path("/sys")
    mountinfo: Path = Path("/proc/self/mountinfo")
    crypttab: Path = Path("/etc/crypttab")
    dev: Path = Path("/dev")
    swaps: Path = Path("/proc/swaps")


# ---- mountinfo -----------------------------------------------------------------------


def _unescape_mountinfo(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in octal.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo_root(text: str) -> tuple[str, str] | None:
    """(major:minor, mount source) of the filesystem mounted on "/", or None.

    The last "/" entry wins: it is the one on top, the one processes see.
    """
    found: tuple[str, str] | None = None
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if _unescape_mountinfo(fields[4]) != "/" or len(fields) < sep + 3:
            continue
        found = (fields[2], _unescape_mountinfo(fields[sep + 2]))
    return found


# Mount points that must not sit on a suspended device while anything runs (SPEC 2.8).
ESSENTIAL_MOUNTS = ("/", "/usr", "/var")


def parse_mountinfo_points(text: str) -> dict[str, tuple[str, str]]:
    """mount point -> (major:minor, mount source); the last entry of a point wins."""
    points: dict[str, tuple[str, str]] = {}
    for line in text.splitlines():
        fields = line.split(" ")
        if len(fields) < 10 or "-" not in fields[6:]:
            continue
        sep = fields.index("-", 6)
        if len(fields) < sep + 3:
            continue
        points[_unescape_mountinfo(fields[4])] = (fields[2], _unescape_mountinfo(fields[sep + 2]))
    return points


def _mount_of(points: dict[str, tuple[str, str]], path: str) -> tuple[str, str] | None:
    """The filesystem `path` lives on: the longest mount point that contains it."""
    best = ""
    for point in points:
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) > len(best):
            best = point
    return points.get(best) if best else None


def parse_swaps(text: str) -> list[tuple[str, str]]:
    """(file name, type) of each active swap area, from /proc/swaps."""
    out = []
    for line in text.splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 2:
            out.append((fields[0].replace("\\040", " "), fields[1]))
    return out


def essential_filesystems(
    mountinfo: str, swaps: str, keyfiles: Sequence[str]
) -> list[tuple[str, str]]:
    """(major:minor, source) of what must stay usable while anything runs: /, /usr, /var,
    the swap areas (a swap file: its filesystem) and the filesystems holding keyfiles."""
    points = parse_mountinfo_points(mountinfo)
    found = [points[p] for p in ESSENTIAL_MOUNTS if p in points]
    for name, kind in parse_swaps(swaps):
        if kind == "partition":
            found.append(("", name))
        elif (fs := _mount_of(points, name)) is not None:
            found.append(fs)
    for path in keyfiles:
        if (fs := _mount_of(points, path)) is not None:
            found.append(fs)
    return found


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


def build_devices(
    nodes: dict[str, BlockNode],
    root: tuple[str, str] | None,
    crypttab: Sequence[CrypttabEntry],
    dev: Path = Path("/dev"),
    essential: Sequence[tuple[str, str]] | None = None,
) -> list[LuksDevice]:
    """The LUKS devices among `nodes`, sorted by dm name. `essential`: what
    essential_filesystems() found; None (unknown): every device counts as essential."""
    entries = {e.name: e for e in crypttab}
    root_kname = _root_kname(nodes, root, dev)
    essential_knames = (
        None
        if essential is None
        else {k for fs in essential if (k := _root_kname(nodes, fs, dev)) is not None}
    )
    out: list[LuksDevice] = []
    for node in nodes.values():
        if node.dm_name is None or node.dm_uuid is None:
            continue
        parsed = parse_dm_uuid(node.dm_uuid)
        if parsed is None:
            continue
        luks_type, uuid = parsed
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
                essential=essential_knames is None
                or node.kname in essential_knames
                or any(k in essential_knames for k in above),
            )
        )
    return sorted(out, key=lambda d: d.name)


def discover_devices(paths: SystemPaths = SystemPaths()) -> list[LuksDevice]:
    nodes = read_block_nodes(paths.sysfs)
    crypttab = read_crypttab(paths.crypttab)
    essential: list[tuple[str, str]] | None = None
    try:
        mountinfo = paths.mountinfo.read_text()
    except OSError as e:
        log.warning("cannot read %s: %s", paths.mountinfo, e)
        root = None
    else:
        root = parse_mountinfo_root(mountinfo)
        try:
            swaps = paths.swaps.read_text()
        except FileNotFoundError:
            swaps = ""  # no swap support in the kernel, or a test tree without the file
        except OSError as e:
            log.warning("cannot read %s: %s", paths.swaps, e)
            swaps = None
        if swaps is not None:
            keyfiles = [
                e.key_source[len("keyfile:") :]
                for e in crypttab
                if e.key_source.startswith("keyfile:")
            ]
            essential = essential_filesystems(mountinfo, swaps, keyfiles)
    return build_devices(nodes, root, crypttab, paths.dev, essential)


def apply_exclude(devices: Iterable[LuksDevice], exclude: Iterable[str]) -> list[LuksDevice]:
    """Drop the devices named in the config's devices.exclude (by dm name or LUKS UUID)."""
    skip = {e.lower() for e in exclude}
    return [d for d in devices if d.name.lower() not in skip and d.uuid.lower() not in skip]


# ---- order ---------------------------------------------------------------------------
# The daemon only needs the suspend order (the helper resumes in its own order, bottom up).


def _ordered(
    devices: Sequence[LuksDevice],
    must_wait_for: Callable[[LuksDevice, LuksDevice], bool],
    priority: Callable[[LuksDevice], tuple[object, ...]],
) -> list[LuksDevice]:
    # Kahn's algorithm: a device is placed once every device it must wait for is placed;
    # among those ready, `priority` picks. Cycles cannot come from real stacking, but a
    # malformed input must not loop forever: leftovers go last in priority order.
    pending = list(devices)
    placed: list[LuksDevice] = []
    while pending:
        ready = [d for d in pending if not any(must_wait_for(d, o) for o in pending if o is not d)]
        if not ready:
            placed.extend(sorted(pending, key=priority))
            break
        first = min(ready, key=priority)
        placed.append(first)
        pending.remove(first)
    return placed


def _is_above(upper: LuksDevice, lower: LuksDevice) -> bool:
    return upper.name in lower.holders


def suspend_order(devices: Sequence[LuksDevice]) -> list[LuksDevice]:
    """Upper layers first: a LUKS device stacked on another is suspended before it."""
    return _ordered(devices, lambda d, o: _is_above(o, d), lambda d: (d.name,))
