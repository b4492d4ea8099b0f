"""The helper's VT prompt read (cryptlockd/helper/vt.py), on a pseudo-terminal."""

from __future__ import annotations

import os
import termios
from pathlib import Path

import pytest

from cryptlockd.helper import protocol
from cryptlockd.helper.prompt_screen import SKIP_KEY, SLEEP_KEY
from cryptlockd.helper.secret import SecretBuffer
from cryptlockd.helper.vt import (
    QUIET_LOGLEVEL,
    Terminal,
    kernel_messages_off,
    restore_console_loglevel,
)


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


def test_esc_and_ctrl_s_end_the_line_at_once_and_the_terminal_is_restored() -> None:
    # Line ends of the prompt's own (VEOL, VEOL2): no Enter needed, and Ctrl+S reaches the
    # prompt instead of stopping the output (IXON off while it reads).
    t, master = pty_terminal()
    before = termios.tcgetattr(t.fd)
    with SecretBuffer() as secret:
        for key in (SLEEP_KEY, SKIP_KEY):

            def type_it(key: int = key) -> bool:
                os.write(master, b"abc" + bytes([key]))
                return False

            assert t.read_secret(secret, type_it) is True
            assert secret.length == 4 and secret.view()[3] == key
    assert termios.tcgetattr(t.fd) == before
    os.close(master)
    os.close(t.fd)


def test_kernel_messages_are_kept_off_while_the_prompt_waits(tmp_path: Path) -> None:
    printk = tmp_path / "printk"
    printk.write_text("7\t4\t1\t7\n")
    with kernel_messages_off(str(printk)):
        assert printk.read_text() == QUIET_LOGLEVEL
    assert printk.read_text() == "7"
    # No /proc to write: the prompt goes on without the quiet.
    with kernel_messages_off(str(tmp_path / "absent")):
        pass


def test_a_prompt_that_died_quiet_gets_its_loglevel_back(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The helper killed at the prompt: the level stays lowered; the recovery's own prompt,
    # or its end, must put back the one the dead prompt found, not the lowered one.
    printk, kept = tmp_path / "printk", tmp_path / "console_loglevel"
    monkeypatch.setattr(protocol, "LOGLEVEL_STATE_IN_RAMFS", str(kept))
    printk.write_text("7\t4\t1\t7\n")
    quiet = kernel_messages_off(str(printk))
    quiet.__enter__()  # and never left: the process died
    assert printk.read_text() == QUIET_LOGLEVEL and kept.read_text() == "7"
    with kernel_messages_off(str(printk)):
        assert printk.read_text() == QUIET_LOGLEVEL
    assert printk.read_text() == "7" and not kept.exists()
    quiet = kernel_messages_off(str(printk))
    quiet.__enter__()
    restore_console_loglevel(str(printk))
    assert printk.read_text() == "7" and not kept.exists()


def test_a_key_pressed_once_the_prompt_is_announced_is_never_flushed() -> None:
    # The announcement (ready) comes after the flush of what was typed ahead: a test, or a
    # person, reacting to it at once loses nothing.
    t, master = pty_terminal()
    with SecretBuffer() as secret:
        assert t.read_secret(secret, None, lambda: os.write(master, b"x\n") and None) is True
        assert bytes(secret.buf[: secret.length]) == b"x"
    os.close(master)
    os.close(t.fd)
