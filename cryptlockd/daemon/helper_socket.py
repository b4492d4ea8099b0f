"""The helper process as its socket in the RAM filesystem shows it: whether one runs, and
telling an idle one to stand down. Blocking calls, each with a timeout."""

from __future__ import annotations

import socket
import time

from cryptlockd.helper import protocol

__all__ = ["alive", "stop_idle"]


def alive(socket_path: str) -> bool:
    # A live helper accepts connections even mid-cycle (the listen backlog), a dead one's
    # socket refuses.
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(1.0)
    try:
        sock.connect(socket_path)
        return True
    except OSError:
        return False
    finally:
        sock.close()


def stop_idle(socket_path: str, timeout: float = 5.0) -> bool:
    """Tell an idle helper to stand down; True once none runs. A busy one (mid-cycle) never
    reads the message, and False comes after `timeout` seconds."""
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(1.0)
        sock.connect(socket_path)
        sock.sendall(protocol.encode({"op": protocol.OP_DISARM}))
        sock.close()
    except OSError:
        return not alive(socket_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not alive(socket_path):
            return True
        time.sleep(0.05)
    return False
