from __future__ import annotations

import pytest

from cryptlockd.helper import protocol


def test_roundtrip_and_line_framing() -> None:
    msg = protocol.arm_message(
        [{"name": "root", "uuid": "u", "key_source": "passphrase"}],
        sleep_state="mem",
        mem_sleep="deep",
        vt=7,
    )
    wire = protocol.encode(msg)
    assert wire.endswith(b"\n") and wire.count(b"\n") == 1
    buf = protocol.LineBuffer()
    # Split mid-message: nothing until the newline arrives, then exactly one message.
    assert buf.feed(wire[:10]) == []
    out = buf.feed(wire[10:] + protocol.encode({"op": protocol.OP_DISARM}))
    assert out == [msg, {"op": "disarm"}]


@pytest.mark.parametrize("line", [b"not json", b"[1,2]", b'{"op": 3}', b"{}", b"\xff\xfe"])
def test_decode_rejects(line: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(line)


def test_encode_needs_op_and_no_nan() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.encode({"x": 1})
    with pytest.raises(ValueError):
        protocol.encode({"op": "x", "v": float("nan")})


def test_overlong_line_rejected() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.LineBuffer().feed(b"x" * (protocol.MAX_LINE + 1))
