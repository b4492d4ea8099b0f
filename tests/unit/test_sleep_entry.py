"""The sleep entry's hand-over rules against a scripted helper on a real unix socket:
fall back to the stock sleep only before the helper was told to sleep, never after."""

from __future__ import annotations

import os
import socket
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from cryptlockd import sleep_entry
from cryptlockd.helper import protocol

Script = Callable[[protocol.Channel], None]


@pytest.fixture
def entry(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, object]]:
    calls: dict[str, object] = {"stock": [], "hooks": []}
    path = str(tmp_path / "helper.sock")
    monkeypatch.setattr(protocol, "SOCKET_PATH", path)
    monkeypatch.setattr(sleep_entry, "stock_sleep", lambda why: calls["stock"].append(why) or 0)  # type: ignore[attr-defined]
    monkeypatch.setattr(sleep_entry, "run_hooks", lambda phase: calls["hooks"].append(phase))  # type: ignore[attr-defined]
    calls["path"] = path
    yield calls


def serve(path: str, script: Script) -> threading.Thread:
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    srv.listen(1)

    def run() -> None:
        conn, _ = srv.accept()
        try:
            script(protocol.Channel(conn))
        finally:
            conn.close()
            srv.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_no_helper_means_stock_sleep(entry: dict[str, object]) -> None:
    assert sleep_entry.main() == 0
    assert entry["stock"] and "no cryptlockd helper" in entry["stock"][0]  # type: ignore[index]


def test_not_armed_means_stock_sleep(entry: dict[str, object]) -> None:
    def script(ch: protocol.Channel) -> None:
        assert ch.receive(5)["op"] == protocol.OP_BEGIN  # type: ignore[index]
        ch.send({"op": protocol.OP_ERROR, "reason": "not armed"})

    t = serve(str(entry["path"]), script)
    assert sleep_entry.main() == 0
    t.join(5)
    assert "not armed" in entry["stock"][0]  # type: ignore[index]
    assert entry["hooks"] == []


def test_full_hand_over_runs_hooks_around_the_sleep(entry: dict[str, object]) -> None:
    seen: list[str] = []

    def script(ch: protocol.Channel) -> None:
        seen.append(ch.receive(5)["op"])  # type: ignore[index]
        ch.send({"op": protocol.OP_READY})
        msg = ch.receive(5)
        assert msg is not None and msg["op"] == protocol.OP_SLEEP
        assert "hooks_pre_end" in msg["times"]
        seen.append(msg["op"])
        ch.send({"op": protocol.OP_RESUMED, "slept": True, "reason": ""})
        seen.append(ch.receive(5)["op"])  # type: ignore[index]
        ch.send({"op": protocol.OP_DONE, "success": True})

    t = serve(str(entry["path"]), script)
    assert sleep_entry.main() == 0
    t.join(5)
    assert seen == ["begin", "sleep", "finish"]
    assert entry["hooks"] == ["pre", "post"] and entry["stock"] == []


def test_helper_lost_after_sleep_never_sleeps_again(entry: dict[str, object]) -> None:
    def script(ch: protocol.Channel) -> None:
        ch.receive(5)
        ch.send({"op": protocol.OP_READY})
        ch.receive(5)  # the sleep order, then the helper vanishes

    t = serve(str(entry["path"]), script)
    assert sleep_entry.main() == 1
    t.join(5)
    assert entry["stock"] == [] and entry["hooks"] == ["pre", "post"]


def test_hook_programs_mask_and_order(tmp_path: Path) -> None:
    lib, etc = tmp_path / "lib", tmp_path / "etc"
    lib.mkdir()
    etc.mkdir()
    for d, name in ((lib, "b"), (lib, "a"), (etc, "b"), (lib, "noexec")):
        p = d / name
        p.write_text("#!/bin/sh\n")
        if name != "noexec":
            p.chmod(0o755)
    os.symlink("/dev/null", etc / "a")
    assert sleep_entry.hook_programs([str(etc), str(lib)]) == [str(etc / "b")]


def test_a_bad_answer_to_begin_means_stock_sleep(entry: dict[str, object]) -> None:
    def script(ch: protocol.Channel) -> None:
        ch.receive(5)
        ch.sock.sendall(b'{"op": "ready"\n')  # not JSON

    t = serve(str(entry["path"]), script)
    assert sleep_entry.main() == 0
    t.join(5)
    assert "the helper is not armed: no answer" in entry["stock"][0]  # type: ignore[index]
    assert entry["hooks"] == []


def test_a_failed_protected_sleep_is_logged_and_not_repeated(
    entry: dict[str, object], capsys: pytest.CaptureFixture[str]
) -> None:
    def script(ch: protocol.Channel) -> None:
        ch.receive(5)
        ch.send({"op": protocol.OP_READY})
        ch.receive(5)
        ch.send({"op": protocol.OP_RESUMED, "slept": False, "reason": "freezing timed out"})
        ch.receive(5)
        ch.send({"op": protocol.OP_DONE, "success": False})

    t = serve(str(entry["path"]), script)
    assert sleep_entry.main() == 1
    t.join(5)
    assert entry["stock"] == [] and entry["hooks"] == ["pre", "post"]
    out = capsys.readouterr().out
    assert "<3>cryptlockd-sleep: the protected sleep failed: freezing timed out\n" in out
