"""Messages between the daemon, the sleep entry and the helper: JSON objects, one a line.

Pure encoding and decoding; the sockets live in main.py (helper side), helper_armer.py and
sleep_entry.py. No message ever carries a passphrase.
"""

from __future__ import annotations

import json

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from typing import Any

    Message = dict[str, Any]

# Inside the helper's root (the ramfs) and as seen from the real root.
RAMFS_DIR = "/run/cryptlockd/ramfs"
SOCKET_IN_RAMFS = "/sock/helper.sock"
SOCKET_PATH = RAMFS_DIR + SOCKET_IN_RAMFS
HELPER_UNIT = "cryptlockd-helper.service"

MAX_LINE = 1 << 20

# daemon -> helper
OP_ARM = "arm"
OP_DISARM = "disarm"
# helper -> daemon
OP_ARMED = "armed"
OP_RECORD = "record"
# sleep entry -> helper, each answered once
OP_BEGIN = "begin"  # -> OP_READY: VT switched, run the pre hooks now
OP_SLEEP = "sleep"  # -> OP_RESUMED: the cycle ran, devices are back, cgroups thawed
OP_FINISH = "finish"  # -> OP_DONE: post hooks ran, VT switched back, record sent
OP_READY = "ready"
OP_RESUMED = "resumed"
OP_DONE = "done"
# either way
OP_ERROR = "error"


class ProtocolError(Exception):
    pass


def encode(msg: Message) -> bytes:
    if not isinstance(msg.get("op"), str):
        raise ProtocolError("a message needs a string 'op'")
    return json.dumps(msg, separators=(",", ":"), allow_nan=False).encode() + b"\n"


def decode(line: bytes) -> Message:
    try:
        msg = json.loads(line)
    except (ValueError, UnicodeDecodeError) as e:
        raise ProtocolError(f"not a JSON line: {e}") from e
    if not isinstance(msg, dict) or not isinstance(msg.get("op"), str):
        raise ProtocolError("a message must be an object with a string 'op'")
    return msg


class LineBuffer:
    """Collects bytes from a stream and yields complete messages."""

    def __init__(self) -> None:
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[Message]:
        self._buf += data
        out: list[Message] = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            line = bytes(self._buf[:nl])
            del self._buf[: nl + 1]
            if line.strip():
                out.append(decode(line))
        if len(self._buf) > MAX_LINE:
            raise ProtocolError("line too long")
        return out


def arm_message(
    devices: list[dict[str, str | int]],
    *,
    sleep_state: str,
    mem_sleep: str | None,
    vt: int = 0,
    freeze_timeout: float = 10.0,
    backoff_initial: float = 1.0,
    backoff_max: float = 30.0,
    poweroff_after: int = 0,
    keyslots: dict[str, int] | None = None,
) -> Message:
    """devices: in suspend order (upper layers first), each {name, uuid, key_source,
    keyfile_size, keyfile_offset}."""
    return {
        "op": OP_ARM,
        "devices": devices,
        "sleep_state": sleep_state,
        "mem_sleep": mem_sleep,
        "vt": vt,
        "freeze_timeout": freeze_timeout,
        "backoff_initial": backoff_initial,
        "backoff_max": backoff_max,
        "poweroff_after": poweroff_after,
        # dm name -> the keyslot that took the passphrase last time: tried first.
        "keyslots": dict(keyslots or {}),
    }
