"""Watching the RAM filesystem's inputs (cryptlockd/daemon/inotify.py): events are parsed from
the kernel's format, and a directory watch reports the watched names whichever way an upgrade
replaces them (renamed over, written in place, touched), and nothing else."""

from __future__ import annotations

import asyncio
import contextlib
import os
import struct
from pathlib import Path

import pytest

from cryptlockd.daemon import inotify
from cryptlockd.daemon.inotify import Event, InputWatcher, parse_events


def packed(wd: int, mask: int, name: bytes) -> bytes:
    padded = name + b"\0" * (16 - len(name) % 16) if name else b""
    return struct.pack("iIII", wd, mask, 0, len(padded)) + padded


def test_parse_events_reads_names_and_nameless_events() -> None:
    buf = packed(1, inotify.IN_MOVED_TO, b"libx.so.1") + packed(2, inotify.IN_IGNORED, b"")
    assert list(parse_events(buf)) == [
        Event(1, inotify.IN_MOVED_TO, "libx.so.1"),
        Event(2, inotify.IN_IGNORED, ""),
    ]
    assert list(parse_events(b"")) == []


async def changes(tmp_path: Path, act: str) -> list[str | None]:
    lib = tmp_path / "lib"
    lib.mkdir()
    (lib / "libx.so.1.2").write_text("old")
    (lib / "other").write_text("x")
    seen: list[str | None] = []
    got = asyncio.Event()

    def on_change(path: str | None) -> None:
        seen.append(path)
        got.set()

    watcher = InputWatcher({str(lib): {"libx.so.1.2"}}, on_change)
    assert watcher.directories == 1 and not watcher.missing
    watcher.start(asyncio.get_running_loop())
    try:
        if act == "rename":
            (lib / "libx.so.1.2.new").write_text("new")
            os.rename(lib / "libx.so.1.2.new", lib / "libx.so.1.2")
        elif act == "write":
            (lib / "libx.so.1.2").write_text("new")
        elif act == "touch":
            os.utime(lib / "libx.so.1.2")
        elif act == "other":
            (lib / "other").write_text("y")
            os.utime(lib / "other")
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(got.wait(), 0.5 if act == "other" else 5)
    finally:
        watcher.close()
    return seen


@pytest.mark.asyncio
@pytest.mark.parametrize("act", ["rename", "write", "touch"])
async def test_a_watched_name_replaced_is_reported(tmp_path: Path, act: str) -> None:
    seen = await changes(tmp_path, act)
    assert seen and set(seen) == {str(tmp_path / "lib" / "libx.so.1.2")}


@pytest.mark.asyncio
async def test_other_names_in_the_directory_are_not(tmp_path: Path) -> None:
    assert await changes(tmp_path, "other") == []


def test_a_missing_directory_is_named_and_lost_watches_mean_unknown(tmp_path: Path) -> None:
    watcher = InputWatcher({str(tmp_path / "gone"): {"x"}, str(tmp_path): {"y"}}, print)
    try:
        assert watcher.missing and str(tmp_path / "gone") in watcher.missing[0]
        assert watcher.directories == 1
        [wd] = watcher._names
        events = [Event(wd, inotify.IN_ATTRIB, "y"), Event(wd, inotify.IN_IGNORED, "")]
        assert watcher.relevant(iter(events)) == [str(tmp_path / "y"), None]
    finally:
        watcher.close()
