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
