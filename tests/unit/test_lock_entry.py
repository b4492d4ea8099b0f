"""The daemon's stand-in for the sleep entry in a Lock() (daemon/lock_entry.py), against a
scripted helper socket; and the record of a lock that never reached the helper's cycle."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from cryptlockd.daemon.lock_cycle import lock_failed_record
from cryptlockd.daemon.lock_entry import HelperEntry
from cryptlockd.daemon.sleep_report import SleepRequest
from cryptlockd.errors import LockFailed
from cryptlockd.helper import protocol


async def scripted_helper(path: Path, replies: dict[str, Any]) -> tuple[asyncio.Server, list[Any]]:
    """Answers each op with replies[op] (None: closes the connection); records what came."""
    seen: list[Any] = []

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        buf = protocol.LineBuffer()
        while data := await reader.read(65536):
            for msg in buf.feed(data):
                seen.append(msg)
                reply = replies.get(msg["op"])
                if reply is None:
                    writer.close()
                    return
                writer.write(protocol.encode(reply))
                await writer.drain()
        writer.close()

    return await asyncio.start_unix_server(serve, str(path)), seen


@pytest.mark.asyncio
async def test_a_lock_is_begun_and_followed_to_its_end(tmp_path: Path) -> None:
    server, seen = await scripted_helper(
        tmp_path / "s",
        {
            "begin": {"op": "ready"},
            "sleep": {"op": "resumed", "slept": False, "reason": ""},
            "finish": {"op": "done", "success": True},
        },
    )
    async with server:
        entry = HelperEntry(str(tmp_path / "s"))
        await entry.begin(5.0)
        assert await entry.run({"lock_requested": 1.0}) == ""
    assert [m["op"] for m in seen] == ["begin", "sleep", "finish"]
    assert seen[1]["times"] == {"lock_requested": 1.0}


@pytest.mark.asyncio
async def test_a_helper_that_refuses_to_begin_fails_the_lock(tmp_path: Path) -> None:
    server, _ = await scripted_helper(
        tmp_path / "s", {"begin": {"op": "error", "reason": "not armed"}}
    )
    async with server:
        with pytest.raises(LockFailed, match="the helper did not begin the cycle: not armed"):
            await HelperEntry(str(tmp_path / "s")).begin(5.0)
    with pytest.raises(LockFailed, match="did not begin the cycle"):
        await HelperEntry(str(tmp_path / "nobody")).begin(5.0)


@pytest.mark.asyncio
async def test_a_helper_gone_mid_cycle_is_reported(tmp_path: Path) -> None:
    server, _ = await scripted_helper(tmp_path / "s", {"begin": {"op": "ready"}})
    async with server:
        entry = HelperEntry(str(tmp_path / "s"))
        await entry.begin(5.0)
        assert await entry.run({}) == "the helper went away during the cycle"


def test_the_record_of_a_lock_that_never_ran() -> None:
    rec = lock_failed_record(SleepRequest(100.0, ["root"]), 100.5, "cannot lock: no helper")
    assert rec["action"] == "lock" and rec["result"] == "failed" and rec["success"] is False
    assert rec["reason"] == "cannot lock: no helper" and rec["suspended"] == []
    assert rec["timeline_ms"] == {"sleep_requested": 0.0, "ended": 500.0}
