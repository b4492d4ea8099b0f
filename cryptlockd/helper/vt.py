"""The helper's virtual terminal: allocate, switch to it and back, prompt with echo off."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import os
import select
import signal
import struct
import termios

from cryptlockd.helper import protocol
from cryptlockd.helper.prompt_screen import SKIP_KEY, SLEEP_KEY
from cryptlockd.helper.secret import SecretBuffer

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from collections.abc import Callable, Iterator
    from types import FrameType

VT_OPENQRY = 0x5600
VT_GETSTATE = 0x5603
VT_ACTIVATE = 0x5606
VT_WAITACTIVE = 0x5607
# How long a display server may take to let go of its VT.
SWITCH_TIMEOUT = 5.0


# The console loglevel: messages of a lower level reach the consoles, this VT included.
PRINTK = "/proc/sys/kernel/printk"
# Only KERN_EMERG while the prompt waits: a panic still shows.
QUIET_LOGLEVEL = "1"


class VtError(Exception):
    pass


@contextlib.contextmanager
def kernel_messages_off(path: str | None = None) -> Iterator[None]:
    """Keeps the kernel's messages off the consoles while the prompt waits (they would
    scroll through the prompt screen), and puts the console loglevel back after. A
    /proc that cannot be written costs the quiet, never the prompt. The level found is
    kept in the RAM filesystem meanwhile: should the helper die at the prompt, the
    recovery's prompt (or its end) restores that one, not the lowered one it would find."""
    path = path or PRINTK
    try:
        with open(path) as f:
            current = f.read().split()[0]
        saved = _saved_loglevel() or current
        with contextlib.suppress(OSError), open(protocol.LOGLEVEL_STATE_IN_RAMFS, "w") as f:
            f.write(saved)
        with open(path, "w") as f:
            f.write(QUIET_LOGLEVEL)
    except (OSError, IndexError):
        yield
        return
    try:
        yield
    finally:
        restore_console_loglevel(path, saved)


def _saved_loglevel() -> str:
    try:
        with open(protocol.LOGLEVEL_STATE_IN_RAMFS) as f:
            return f.read().strip()
    except OSError:
        return ""


def restore_console_loglevel(path: str | None = None, level: str = "") -> None:
    """Puts back the level a prompt lowered (`level`, or the one it kept), if any."""
    level = level or _saved_loglevel()
    if level:
        with contextlib.suppress(OSError), open(path or PRINTK, "w") as f:
            f.write(level)
    with contextlib.suppress(OSError):
        os.unlink(protocol.LOGLEVEL_STATE_IN_RAMFS)


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise TimeoutError("VT switch did not complete")


class Terminal:
    def __init__(self, number: int = 0) -> None:
        with open("/dev/tty0", "rb", buffering=0) as tty0:
            if number <= 0:
                buf = fcntl.ioctl(tty0, VT_OPENQRY, struct.pack("i", 0))
                number = struct.unpack("i", buf)[0]
                if number <= 0:
                    raise VtError("no free virtual terminal")
            state = fcntl.ioctl(tty0, VT_GETSTATE, struct.pack("HHH", 0, 0, 0))
            self.original = struct.unpack("HHH", state)[0]
        self.number = number
        self.fd = self._open()

    def _open(self) -> int:
        return os.open(f"/dev/tty{self.number}", os.O_RDWR | os.O_NOCTTY | os.O_CLOEXEC)

    def reopen(self) -> None:
        """A fresh file on the VT: after a hangup (vhangup, a getty that took it over) the
        old one answers EIO or end of file for good; a new open works again."""
        fd = self._open()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = fd

    def hang_up(self) -> None:
        """vhangup() of the VT, for the fault hook (tests): as a getty or a careless
        `vhangup` would. A child takes the VT as its controlling terminal and hangs it up;
        every file open on it then fails, ours included."""
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            try:
                signal.signal(signal.SIGHUP, signal.SIG_IGN)
                os.setsid()
                fd = os.open(f"/dev/tty{self.number}", os.O_RDWR)
                with contextlib.suppress(OSError):
                    fcntl.ioctl(fd, termios.TIOCSCTTY, 1)
                ctypes.CDLL(None).vhangup()
                os.close(fd)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)

    def activate(self, number: int, timeout: float = SWITCH_TIMEOUT) -> None:
        self.start_activate(number)
        self.wait_active(number, timeout)

    def start_activate(self, number: int) -> None:
        """Asks for the switch and returns at once: the display server lets go of its VT
        meanwhile (VT_PROCESS mode), while the caller gets on with other work."""
        try:
            fcntl.ioctl(self.fd, VT_ACTIVATE, number)
        except OSError as e:
            raise VtError(f"switching to VT {number}: {e}") from e

    def wait_active(self, number: int, timeout: float = SWITCH_TIMEOUT) -> None:
        # VT_WAITACTIVE blocks for good if a display server in VT_PROCESS mode never lets
        # go; an alarm turns that into an error.
        old = signal.signal(signal.SIGALRM, _alarm)
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            fcntl.ioctl(self.fd, VT_WAITACTIVE, number)
        except OSError as e:
            raise VtError(f"switching to VT {number}: {e}") from e
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    def switch_to(self) -> None:
        self.activate(self.number)

    def switch_back(self) -> None:
        if self.original and self.original != self.number:
            self.activate(self.original)

    def write(self, text: str) -> None:
        data = text.replace("\n", "\r\n").encode()
        while data:
            n = os.write(self.fd, data)
            data = data[n:]

    def flush_input(self) -> None:
        termios.tcflush(self.fd, termios.TCIFLUSH)

    def read_secret(
        self,
        secret: SecretBuffer,
        give_up: Callable[[], bool] | None = None,
        ready: Callable[[], None] | None = None,
    ) -> bool | None:
        """One line with echo off, straight into `secret`. False at end of file. With
        `give_up`, asked every second until a line is there: when it says so, None.
        `ready` draws the prompt and announces it: called once the terminal is set, which
        discards what was typed before (TCSAFLUSH), so that a key pressed after the
        announcement is never lost.

        Besides Enter, the prompt's keys end a line at once (prompt_screen: Esc as VEOL,
        Ctrl+S as VEOL2, which needs IEXTEN; IXON off, or Ctrl+S would stop the output)."""
        old = termios.tcgetattr(self.fd)
        new = list(old)
        new[0] = new[0] & ~termios.IXON
        new[3] = (new[3] & ~termios.ECHO) | termios.ICANON | termios.ECHONL | termios.IEXTEN
        cc = list(new[6])
        cc[termios.VEOL] = bytes([SLEEP_KEY])
        cc[termios.VEOL2] = bytes([SKIP_KEY])
        new[6] = cc
        termios.tcsetattr(self.fd, termios.TCSAFLUSH, new)
        try:
            if ready is not None:
                ready()
            # Canonical mode: the VT reads as ready once a whole line is there.
            while give_up is not None and not select.select([self.fd], [], [], 1.0)[0]:
                if give_up():
                    return None
            return secret.read_line_from(self.fd)
        finally:
            termios.tcsetattr(self.fd, termios.TCSANOW, old)

    def close(self) -> None:
        os.close(self.fd)
