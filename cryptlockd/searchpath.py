"""systemd's rule for settings spread over several directories, written once.

A search path lists directories from the highest precedence to the lowest (/etc, /run,
/usr/local/lib, /usr/lib). A file name found in a higher directory masks the same name in
every lower one, and a file that is a link to /dev/null masks the name without taking its
place. What remains applies in the order of the names. Hidden files never count.
Used for sleep.conf, our own config's drop-ins, the system-sleep hooks and the unit path.
"""

from __future__ import annotations

import os

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = ["UNIT_PATH", "first_file", "merged_dir"]

# The unit search path of a system manager, with Debian's /lib/systemd/system last.
UNIT_PATH = (
    "/etc/systemd/system",
    "/run/systemd/system",
    "/usr/local/lib/systemd/system",
    "/usr/lib/systemd/system",
    "/lib/systemd/system",
)


def _under(root: str, path: str) -> str:
    return os.path.join(root, path.lstrip("/"))


def merged_dir(dirs: Sequence[str], suffix: str = "", root: str = "/") -> list[str]:
    """The files of `dirs` (highest precedence first) named `*<suffix>`, masked by name, in
    name order. A directory that does not exist counts as empty; another error reading one
    raises OSError."""
    chosen: dict[str, str] = {}
    for d in dirs:
        directory = _under(root, d)
        try:
            names = os.listdir(directory)
        except (FileNotFoundError, NotADirectoryError):
            continue
        for name in names:
            if name.startswith(".") or not name.endswith(suffix) or name in chosen:
                continue
            chosen[name] = os.path.join(directory, name)
    return [
        chosen[name] for name in sorted(chosen) if os.path.realpath(chosen[name]) != "/dev/null"
    ]


def first_file(paths: Sequence[str], root: str = "/") -> str | None:
    """The first of `paths` (highest precedence first) that is a regular file."""
    for path in paths:
        candidate = _under(root, path)
        try:
            if os.path.isfile(candidate):
                return candidate
        except OSError:
            continue
    return None
