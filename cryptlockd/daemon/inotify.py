"""Watching the RAM filesystem's inputs with inotify (stdlib and ctypes; no polling).

Package upgrades rarely write a file in place: dpkg and pip unpack a new file next to the
old one and rename it over, which replaces the inode. A watch on a file would be left on
the old inode, so the directories are watched, and their events filtered by the names of
interest (the closure's files, and the soname links that lead to them).
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import logging
import os
import struct
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass

__all__ = ["Event", "InputWatcher", "parse_events"]

log = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_MOVED_FROM = 0x00000040
IN_MOVED_TO = 0x00000080
IN_CREATE = 0x00000100
IN_DELETE = 0x00000200
IN_DELETE_SELF = 0x00000400
IN_MOVE_SELF = 0x00000800
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
IN_ONLYDIR = 0x01000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC

# A child written, touched, created, renamed or removed; the directory itself going away.
DIR_MASK = (
    IN_MODIFY
    | IN_ATTRIB
    | IN_CLOSE_WRITE
    | IN_MOVED_FROM
    | IN_MOVED_TO
    | IN_CREATE
    | IN_DELETE
    | IN_DELETE_SELF
    | IN_MOVE_SELF
    | IN_ONLYDIR
)
# The watch itself is gone (its directory removed or replaced), or events were lost: what
# changed is unknown, so the caller must look for itself.
LOST = IN_Q_OVERFLOW | IN_IGNORED | IN_DELETE_SELF | IN_MOVE_SELF

_HEADER = struct.Struct("iIII")  # struct inotify_event: wd, mask, cookie, len


@dataclass(frozen=True)
class Event:
    wd: int
    mask: int
    name: str


def parse_events(buf: bytes) -> Iterator[Event]:
    """The events in one read() of an inotify fd; each name is NUL-padded to `len`."""
    pos = 0
    while pos + _HEADER.size <= len(buf):
        wd, mask, _cookie, length = _HEADER.unpack_from(buf, pos)
        pos += _HEADER.size
        raw = buf[pos : pos + length]
        pos += length
        yield Event(wd, mask, raw.split(b"\0", 1)[0].decode(errors="surrogateescape"))


def _libc() -> ctypes.CDLL:
    libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    libc.inotify_init1.argtypes = [ctypes.c_int]
    libc.inotify_init1.restype = ctypes.c_int
    libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]
    libc.inotify_add_watch.restype = ctypes.c_int
    return libc


class InputWatcher:
    """Calls `on_change(path)` in the event loop when a watched name changes in one of the
    watched directories (`targets`: directory -> names), and `on_change(None)` when the
    watcher cannot tell (events lost, a directory gone)."""

    def __init__(
        self, targets: Mapping[str, set[str]], on_change: Callable[[str | None], None]
    ) -> None:
        self._on_change = on_change
        self._libc = _libc()
        self._fd = self._libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)
        if self._fd < 0:
            err = ctypes.get_errno()
            raise OSError(err, f"inotify_init1: {os.strerror(err)}")
        # Two paths to one directory (/lib -> usr/lib) give the same watch descriptor.
        self._names: dict[int, tuple[str, set[str]]] = {}
        self.missing: list[str] = []
        for directory, names in sorted(targets.items()):
            wd = self._libc.inotify_add_watch(self._fd, os.fsencode(directory), DIR_MASK)
            if wd < 0:
                self.missing.append(f"{directory}: {os.strerror(ctypes.get_errno())}")
                continue
            self._names.setdefault(wd, (directory, set()))[1].update(names)
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def directories(self) -> int:
        return len(self._names)

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        loop.add_reader(self._fd, self._read)

    def close(self) -> None:
        if self._fd < 0:
            return
        if self._loop is not None:
            self._loop.remove_reader(self._fd)
        os.close(self._fd)
        self._fd = -1

    def _read(self) -> None:
        try:
            buf = os.read(self._fd, 65536)
        except BlockingIOError:
            return
        except OSError as e:
            log.error("reading inotify events failed: %s", e)
            self._on_change(None)
            return
        for changed in self.relevant(parse_events(buf)):
            self._on_change(changed)

    def relevant(self, events: Iterator[Event]) -> list[str | None]:
        """The changes among `events` that concern a watched name (None: unknown)."""
        out: list[str | None] = []
        for e in events:
            if e.mask & LOST and not e.name:
                out.append(None)
                continue
            watched = self._names.get(e.wd)
            if watched is not None and e.name in watched[1]:
                out.append(os.path.join(watched[0], e.name))
        return out
