from __future__ import annotations

import os

from cryptlockd.helper.secret import SecretBuffer


def test_read_strips_newline_and_wipe_zeroes() -> None:
    r, w = os.pipe()
    try:
        os.write(w, b"Lid-Shut_Tight!42\n")
        secret = SecretBuffer(64)
        assert secret.read_line_from(r)
        assert secret.length == len("Lid-Shut_Tight!42")
        assert bytes(secret.buf[: secret.length]) == b"Lid-Shut_Tight!42"
        assert not secret.is_zero()
        secret.wipe()
        assert secret.is_zero() and secret.length == 0
    finally:
        os.close(r)
        os.close(w)


def test_context_manager_wipes_on_error() -> None:
    secret = SecretBuffer(32)
    try:
        with secret:
            secret.view()[:6] = b"secret"
            raise RuntimeError("boom")
    except RuntimeError:
        pass
    assert secret.is_zero()


def test_eof_reports_false() -> None:
    r, w = os.pipe()
    os.close(w)
    try:
        assert SecretBuffer(16).read_line_from(r) is False
    finally:
        os.close(r)
