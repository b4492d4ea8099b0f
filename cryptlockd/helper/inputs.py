"""The lid switch and the keyboards, read by the helper itself while it prompts.

Everything else is frozen at the prompt, logind included, so nobody else would notice the
lid closing. The lid's state comes from EVIOCGSW on each input device that has SW_LID.
The keyboards are only watched for whether a key was pressed since the wake (select()
says readable): their events are never read, so no keystroke of the passphrase ever
reaches this process through them; closing the file drops them.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import select
import struct

INPUT_CLASS = "/sys/class/input"
EV_KEY = 1
EV_SW = 5
SW_LID = 0
KEY_ENTER = 28
KEY_A = 30
_LONG_BITS = struct.calcsize("L") * 8
_SW_BYTES = 8  # SW_MAX is 0x10: the whole switch bitmap fits


def _eviocgsw(length: int) -> int:
    # _IOC(_IOC_READ, 'E', 0x1b, len)
    return (2 << 30) | (length << 16) | (ord("E") << 8) | 0x1B


def bitmap_has(text: str, bit: int) -> bool:
    """Whether a sysfs capability bitmap (hex words, most significant first, one per
    long, without leading zeros) has `bit`. Pure."""
    words = text.split()
    width = _LONG_BITS
    index = len(words) - 1 - bit // width
    if index < 0:
        return False
    try:
        return bool(int(words[index], 16) >> (bit % width) & 1)
    except ValueError:
        return False


def _read(path: str) -> str:
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


def find_devices(root: str = INPUT_CLASS) -> tuple[list[str], list[str]]:
    """(lid switches, keyboards): /dev/input/eventN paths, from sysfs."""
    lids: list[str] = []
    keyboards: list[str] = []
    try:
        names = sorted(n for n in os.listdir(root) if n.startswith("event"))
    except OSError:
        return lids, keyboards
    for name in names:
        caps = os.path.join(root, name, "device", "capabilities")
        if bitmap_has(_read(os.path.join(caps, "sw")), SW_LID):
            lids.append(f"/dev/input/{name}")
        keys = _read(os.path.join(caps, "key"))
        if bitmap_has(keys, KEY_ENTER) and bitmap_has(keys, KEY_A):
            keyboards.append(f"/dev/input/{name}")
    return lids, keyboards


class Inputs:
    """The input devices of one wake: opened when the prompt first waits, closed when
    the machine sleeps again or the prompt is over."""

    def __init__(self) -> None:
        self.lids: list[int] = []
        self.keyboards: list[int] = []
        lids, keyboards = find_devices()
        for path, into in [(p, self.lids) for p in lids] + [(p, self.keyboards) for p in keyboards]:
            with contextlib.suppress(OSError):
                into.append(os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC))

    def lid_closed(self) -> bool | None:
        """True when a lid switch says closed; None without one that answers."""
        seen = False
        for fd in self.lids:
            try:
                bits = fcntl.ioctl(fd, _eviocgsw(_SW_BYTES), bytes(_SW_BYTES))
            except OSError:
                continue
            seen = True
            if bits[SW_LID // 8] >> (SW_LID % 8) & 1:
                return True
        return False if seen else None

    def touched(self) -> bool:
        if not self.keyboards:
            return False
        try:
            return bool(select.select(self.keyboards, [], [], 0)[0])
        except (OSError, ValueError):
            return False

    def close(self) -> None:
        for fd in self.lids + self.keyboards:
            with contextlib.suppress(OSError):
                os.close(fd)
        self.lids, self.keyboards = [], []
