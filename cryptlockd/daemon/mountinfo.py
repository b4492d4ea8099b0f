"""What /proc/self/mountinfo and /proc/swaps say: the file system behind a path, and the
ones that must stay usable while anything runs (SPEC 2.8). Pure: the texts are passed in."""

from __future__ import annotations

import re

__all__ = [
    "ESSENTIAL_MOUNTS",
    "essential_filesystems",
    "mount_of",
    "parse_mountinfo_points",
    "parse_mountinfo_root",
    "parse_swaps",
]


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


def mount_of(points: dict[str, tuple[str, str]], path: str) -> tuple[str, str] | None:
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


def essential_filesystems(mountinfo: str, swaps: str) -> list[tuple[str, str]]:
    """(major:minor, source) of what must stay usable while anything runs: /, /usr, /var
    and the swap areas (a swap file: its filesystem). What holds their keyfiles and
    headers follows from the graph (device_graph.py)."""
    points = parse_mountinfo_points(mountinfo)
    found = [points[p] for p in ESSENTIAL_MOUNTS if p in points]
    for name, kind in parse_swaps(swaps):
        if kind == "partition":
            found.append(("", name))
        elif (fs := mount_of(points, name)) is not None:
            found.append(fs)
    return found
