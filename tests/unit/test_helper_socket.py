"""The helper as its socket shows it (cryptlockd/daemon/helper_socket.py): alive or not,
told to stand down, and polled for where nothing announces it."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from pathlib import Path

import pytest

from cryptlockd.daemon import helper_socket
from cryptlockd.daemon.helper_socket import poll_until


@pytest.mark.asyncio
async def test_poll_until_stops_at_the_deadline_or_the_event() -> None:
    tries = 0

    async def never() -> int | None:
        nonlocal tries
        tries += 1
        return None

    t0 = time.monotonic()
    assert await poll_until(never, t0 + 0.1, every=0.01) is None
    assert time.monotonic() - t0 >= 0.1 and tries > 2
    changed = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, changed.set)
    t0 = time.monotonic()
    assert await poll_until(never, t0 + 10, every=5.0, unless=changed) is None
    assert time.monotonic() - t0 < 5

    async def soon() -> str | None:
        return "yes" if time.monotonic() - t0 > 0.05 else None

    t0 = time.monotonic()
    assert await poll_until(soon, t0 + 10, every=0.01) == "yes"


def test_stop_idle_waits_for_the_helper_to_go(tmp_path: Path) -> None:
    path = str(tmp_path / "helper.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    got: list[bytes] = []

    def idle_helper() -> None:
        conn, _ = listener.accept()
        got.append(conn.recv(4096))
        listener.close()  # the helper's finally, then its exit closes the rest
        os.unlink(path)
        conn.close()

    t = threading.Thread(target=idle_helper)
    t.start()
    assert helper_socket.stop_idle(path, timeout=5.0)
    t.join()
    assert got == [b'{"op":"disarm"}\n']
    assert not helper_socket.alive(path)


def test_stop_idle_gives_up_on_a_busy_helper(tmp_path: Path) -> None:
    path = str(tmp_path / "helper.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(4)  # accepts through the backlog, never reads: mid-cycle
        t0 = time.monotonic()
        assert not helper_socket.stop_idle(path, timeout=0.2)
        assert time.monotonic() - t0 >= 0.2
