"""The helper process as its socket in the RAM filesystem shows it: whether one runs,
telling an idle one to stand down (blocking calls, each with a timeout), and waiting for one
to listen, which nothing announces (poll_until)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from cryptlockd.helper import protocol

__all__ = ["alive", "connect", "poll_until", "stop_idle"]

T = TypeVar("T")


def connect(socket_path: str, timeout: float = 1.0) -> socket.socket | None:
    """A blocking connection to the helper, or None when nothing listens. A unix socket's
    connect() is done at once while the listener has room in its backlog."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(timeout)
    try:
        sock.connect(socket_path)
    except OSError:
        sock.close()
        return None
    return sock


def alive(socket_path: str) -> bool:
    # A live helper accepts connections even mid-cycle (the listen backlog), a dead one's
    # socket refuses.
    sock = connect(socket_path)
    if sock is None:
        return False
    sock.close()
    return True


def stop_idle(socket_path: str, timeout: float = 5.0) -> bool:
    """Tell an idle helper to stand down; True once none runs. A busy one (mid-cycle) never
    reads the message, and False comes after `timeout` seconds."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        try:
            sock.settimeout(1.0)
            sock.connect(socket_path)
            sock.sendall(protocol.encode({"op": protocol.OP_DISARM}))
        except OSError:
            return not alive(socket_path)
        # It exits when told, and its end of this connection closes with it.
        deadline = time.monotonic() + timeout
        try:
            while (left := deadline - time.monotonic()) > 0:
                sock.settimeout(left)
                if not sock.recv(4096):
                    break
        except OSError:  # timed out, or reset
            pass
    return not alive(socket_path)


async def poll_until(
    check: Callable[[], Awaitable[T | None]],
    deadline: float,
    *,
    every: float,
    unless: asyncio.Event | None = None,
) -> T | None:
    """For what nothing announces (a unix socket starting to accept): check() every `every`
    seconds until it returns something, which is returned. None once `deadline`
    (time.monotonic()) has passed, or as soon as `unless` is set."""
    while True:
        result = await check()
        if result is not None:
            return result
        left = deadline - time.monotonic()
        if left <= 0 or (unless is not None and unless.is_set()):
            return None
        if unless is None:
            await asyncio.sleep(min(every, left))
        else:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(unless.wait(), min(every, left))
