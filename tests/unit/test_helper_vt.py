"""The helper's VT prompt read (cryptlockd/helper/vt.py), on a pseudo-terminal."""

from __future__ import annotations

import os

from cryptlockd.helper.secret import SecretBuffer
from cryptlockd.helper.vt import Terminal


def pty_terminal() -> tuple[Terminal, int]:
    master, slave = os.openpty()
    t = Terminal.__new__(Terminal)  # no /dev/tty0 here: only the read is under test
    t.fd = slave
    return t, master


def test_the_read_gives_up_when_asked_and_reads_a_line_otherwise() -> None:
    t, master = pty_terminal()
    asked: list[int] = []
    with SecretBuffer() as secret:
        assert t.read_secret(secret, lambda: asked.append(1) is None) is None
        assert asked == [1] and secret.length == 0

        # The line is typed once the prompt waits (give_up is first asked after a second of
        # nothing): typed before, it would be discarded, as keys typed ahead of a prompt are.
        def type_it() -> bool:
            os.write(master, b"typed\n")
            return False

        assert t.read_secret(secret, type_it) is True
        assert bytes(secret.buf[: secret.length]) == b"typed"
    os.close(master)
    os.close(t.fd)
