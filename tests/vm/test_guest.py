"""The harness's waiting rule (Guest.until and what builds on it), on the host: no QEMU.

A guest that stops answering must be reported within the deadline, as hung, with what QEMU
and the console showed; a QEMU that exited must end the wait at once (SPEC 6)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.vm import image as image_mod
from tests.vm.guest import DiskSet, Guest, GuestError, GuestHung, GuestLost

pytestmark = [pytest.mark.asyncio, pytest.mark.timeout(60)]


@pytest_asyncio.fixture
async def guest(tmp_path: Path) -> AsyncIterator[Guest]:
    files = {f: tmp_path / f for f in ("root_disk", "data_disk", "kernel", "initrd")}
    image = image_mod.TestbedImage("bookworm", tmp_path, "3.11", "6.1.0", {}, **files)
    g = Guest(image, DiskSet(tmp_path / "root", tmp_path / "data"), tmp_path / "work", "tcg")
    g.console_log.write_text("boot\ncryptlockd: prompt\nmore\ncryptlockd: prompt\n")
    yield g
    await g.close()


async def never() -> bool:
    return False


async def test_deadline_reports_the_wait_the_last_reason_and_the_console(guest: Guest) -> None:
    async def not_yet() -> bool:
        raise GuestError("exit 1, output: nope")

    start = time.monotonic()
    with pytest.raises(GuestError) as caught:
        await guest.until(not_yet, 0.3, "the thing", interval=0.05)
    assert time.monotonic() - start < 5
    assert not isinstance(caught.value, GuestHung)
    text = str(caught.value)
    assert "the thing: not true within 0 s; last: exit 1, output: nope" in text, text
    assert "QEMU state: unknown" in text and "cryptlockd: prompt" in text, text


async def test_deadline_of_an_answer_is_a_hung_guest(guest: Guest) -> None:
    with pytest.raises(GuestHung, match="the agent answers: not true within"):
        await guest.until(never, 0.2, "the agent answers", interval=0.05, hung=True)


async def test_a_hang_inside_the_predicate_ends_the_wait_at_once(guest: Guest) -> None:
    async def hangs() -> bool:
        raise GuestHung("the guest agent gave no answer within 40 s")

    start = time.monotonic()
    with pytest.raises(GuestHung, match="no answer within 40 s"):
        await guest.until(hangs, 30, "a command")
    assert time.monotonic() - start < 5


async def test_an_exited_qemu_ends_the_wait_at_once(guest: Guest) -> None:
    guest._proc = await asyncio.create_subprocess_exec("sh", "-c", "exit 3")
    await guest._proc.wait()
    start = time.monotonic()
    with pytest.raises(GuestLost, match="QEMU exited with status 3"):
        await guest.until(never, 30, "anything")
    assert time.monotonic() - start < 5


async def test_wait_console_counts_what_was_there_before(guest: Guest) -> None:
    await guest.wait_console("cryptlockd: prompt", 1, after=1)
    with pytest.raises(GuestError, match="seen 2 times before"):
        await guest.wait_console("cryptlockd: prompt", 0.3, after=2)
