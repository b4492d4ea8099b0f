from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from cryptlockd.helper import protocol


def test_roundtrip_and_line_framing() -> None:
    msg = protocol.arm_message(
        [
            {
                "name": "root",
                "uuid": "u",
                "key_source": "passphrase",
                "keyfile_size": 0,
                "keyfile_offset": 0,
            }
        ],
        sleep_state="mem",
        mem_sleep="deep",
        vt=7,
        freeze_timeout=protocol.DEFAULT_FREEZE_TIMEOUT,
        backoff_initial=protocol.DEFAULT_BACKOFF_INITIAL,
        backoff_max=protocol.DEFAULT_BACKOFF_MAX,
        poweroff_after=protocol.DEFAULT_POWEROFF_AFTER,
        keyslots={},
    )
    wire = protocol.encode(msg)
    assert wire.endswith(b"\n") and wire.count(b"\n") == 1
    buf = protocol.LineBuffer()
    # Split mid-message: nothing until the newline arrives, then exactly one message.
    assert buf.feed(wire[:10]) == []
    out = buf.feed(wire[10:] + protocol.encode({"op": protocol.OP_DISARM}))
    assert out == [msg, {"op": "disarm"}]


def test_the_sync_deadlines_travel_in_the_arm_message_and_an_older_one_decodes() -> None:
    msg = protocol.arm_message(
        [],
        sleep_state="mem",
        mem_sleep=None,
        vt=0,
        freeze_timeout=10.0,
        sync_timeout=5.0,
        syncfs_timeout=7.0,
        backoff_initial=1.0,
        backoff_max=30.0,
        poweroff_after=0,
        keyslots={},
    )
    assert (msg["sync_timeout"], msg["syncfs_timeout"]) == (5.0, 7.0)
    # An older daemon's arm message has neither: the helper takes the defaults.
    line = protocol.encode(msg).replace(b',"sync_timeout":5.0,"syncfs_timeout":7.0', b"")
    assert b"sync_timeout" not in line
    assert protocol.decode(line)["op"] == protocol.OP_ARM


@pytest.mark.parametrize("line", [b"not json", b"[1,2]", b'{"op": 3}', b"{}", b"\xff\xfe"])
def test_decode_rejects(line: bytes) -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.decode(line)


@pytest.mark.parametrize(
    ("line", "error"),
    [
        (b'{"op": "bogus"}', "unknown message 'bogus'"),
        (b'{"op": "sleep"}', "'sleep' message without times"),
        (b'{"op": "resumed", "slept": true}', "'resumed' message without reason"),
        (b'{"op": "armed", "pid": 1}', "'armed' message without vt, reserve_kib"),
    ],
)
def test_decode_names_an_unknown_message_and_the_missing_keys(line: bytes, error: str) -> None:
    with pytest.raises(protocol.ProtocolError, match=error):
        protocol.decode(line)


def test_every_operation_has_its_required_keys() -> None:
    ops = {v for k, v in vars(protocol).items() if k.startswith("OP_")}
    assert ops == set(protocol.REQUIRED_KEYS)
    assert protocol.decode(b'{"op": "done", "success": true, "extra": 1}')["op"] == "done"


def test_encode_needs_op_and_no_nan() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.encode({"x": 1})  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        protocol.encode({"op": "x", "v": float("nan")})  # type: ignore[arg-type]


def test_overlong_line_rejected() -> None:
    with pytest.raises(protocol.ProtocolError):
        protocol.LineBuffer().feed(b"x" * (protocol.MAX_LINE + 1))


def test_ramfs_paths_seen_from_the_host() -> None:
    assert protocol.SOCKET_PATH == protocol.RAMFS_DIR + protocol.SOCKET_IN_RAMFS
    assert protocol.on_host(protocol.FROZEN_STATE_IN_RAMFS, "/r") == "/r/state/frozen"
    assert protocol.on_host(protocol.SYNC_STATE_IN_RAMFS, "/r") == "/r/state/sync_on_suspend"


def test_boottime_is_a_clock_that_moves_forward() -> None:
    a = protocol.boottime()
    assert 0 < a <= protocol.boottime()


@pytest.fixture
def pair() -> Iterator[tuple[protocol.Channel, socket.socket]]:
    ours, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    chan = protocol.Channel(ours)
    yield chan, peer
    chan.close()
    peer.close()


def test_channel_sends_and_receives_whole_messages(
    pair: tuple[protocol.Channel, socket.socket],
) -> None:
    chan, peer = pair
    chan.send({"op": protocol.OP_BEGIN})
    assert peer.recv(100) == b'{"op":"begin"}\n'
    # Two messages in one read, the second in two pieces.
    peer.sendall(b'{"op":"ready"}\n{"op":"done",')
    assert chan.receive(1.0) == {"op": "ready"}
    peer.sendall(b'"success":true}\n')
    assert chan.receive(1.0) == {"op": "done", "success": True}


def test_channel_receive_times_out_with_none(pair: tuple[protocol.Channel, socket.socket]) -> None:
    chan, peer = pair
    peer.sendall(b'{"op":"ready"')  # no newline: not a message yet
    start = time.monotonic()
    assert chan.receive(0.2) is None
    assert 0.15 <= time.monotonic() - start < 2.0
    peer.sendall(b"}\n")
    assert chan.receive(0) == {"op": "ready"}  # the partial line was kept


def test_channel_receive_at_end_of_stream_is_none(
    pair: tuple[protocol.Channel, socket.socket],
) -> None:
    chan, peer = pair
    peer.sendall(b'{"op":"ready"}\n')
    peer.close()
    assert chan.receive(1.0) == {"op": "ready"}
    assert chan.receive(1.0) is None
    assert chan.receive(None) is None  # and never blocks once the peer is gone


def test_channel_receive_raises_on_a_bad_line(
    pair: tuple[protocol.Channel, socket.socket],
) -> None:
    chan, peer = pair
    peer.sendall(b'{"op":"sleep"}\n')
    with pytest.raises(protocol.ProtocolError, match="without times"):
        chan.receive(1.0)


def test_connect_to_nothing_is_none(tmp_path: Path) -> None:
    assert protocol.connect(str(tmp_path / "absent.sock")) is None


def test_connect_reaches_a_listener(tmp_path: Path) -> None:
    path = str(tmp_path / "helper.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)
    try:
        chan = protocol.connect(path, timeout=1.0)
        assert chan is not None
        conn, _ = listener.accept()
        chan.send({"op": protocol.OP_DISARM})
        assert protocol.Channel(conn).receive(1.0) == {"op": "disarm"}
        conn.close()
        chan.close()
    finally:
        listener.close()


def test_a_receive_that_times_out_is_not_an_end() -> None:
    # Whoever waits with a deadline must tell a silent peer from one that went away
    # (session.Helper.wait_watchdogs): a None from a timeout leaves `ended` unset.
    ours, theirs = socket.socketpair()
    ch = protocol.Channel(ours)
    assert ch.receive(0.05) is None and not ch.ended
    theirs.sendall(protocol.encode({"op": protocol.OP_DISARM}))
    theirs.close()
    assert ch.receive(1.0) == {"op": "disarm"} and not ch.ended
    assert ch.receive(1.0) is None and ch.ended
    ch.close()
