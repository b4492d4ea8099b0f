"""A passphrase buffer that never becomes a Python str or bytes.

It is a ctypes array (so libcryptsetup gets a pointer to it, not a copy), filled by
readv() straight from the terminal, and wiped with memset.
"""

from __future__ import annotations

import ctypes
import os


class SecretBuffer:
    def __init__(self, size: int = 1024) -> None:
        self.size = size
        self.buf = (ctypes.c_char * size)()
        self.length = 0

    def view(self) -> memoryview:
        return memoryview(self.buf).cast("B")

    def read_line_from(self, fd: int) -> bool:
        """Read one line (canonical tty read) into the buffer; drop the newline. False on
        end of file. A line longer than the buffer is cut short and the rest discarded."""
        self.wipe()
        with self.view() as view:
            n = os.readv(fd, [view])
            if n == 0:
                return False
            # Compare as ints through the view: indexing the ctypes array would make a
            # bytes object of a passphrase character.
            if view[n - 1] == 0x0A:
                n -= 1
                view[n] = 0
        self.length = n
        return True

    def pointer(self) -> ctypes.c_char_p:
        return ctypes.cast(self.buf, ctypes.c_char_p)

    def wipe(self) -> None:
        ctypes.memset(self.buf, 0, self.size)
        self.length = 0

    def is_zero(self) -> bool:
        with self.view() as view:
            return not any(view)

    def __enter__(self) -> SecretBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.wipe()
