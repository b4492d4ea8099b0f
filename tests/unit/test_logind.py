"""logind's owner as the daemon follows it (cryptlockd/daemon/logind.py): a logind that
leaves the bus or is replaced never sends the PrepareForSleep(false) of a sleep under way,
so the sleep cycle hears of every change of owner, but not of the first one (at start)."""

from __future__ import annotations

from typing import Any

import pytest

from cryptlockd.daemon.logind import Logind
from tests.unit.test_manager import FakeBus


@pytest.mark.asyncio
async def test_the_sleep_cycle_hears_of_each_change_of_owner_but_the_first() -> None:
    changes: list[str | None] = []
    bus: Any = FakeBus()

    async def pfs(start: bool) -> None:
        pass

    async def owner_changed() -> None:
        changes.append(logind.owner)

    logind = Logind(
        bus,
        on_prepare_for_sleep=pfs,
        on_change=lambda: None,
        on_owner_change=owner_changed,
        timeout=1.0,
    )
    await logind._set_owner(":1.1")  # at start
    assert changes == []
    await logind._set_owner(":1.1")  # no change
    await logind._set_owner(":1.7")  # restarted
    await logind._set_owner(None)  # gone
    await logind._set_owner(":1.9")  # back: nothing was under way with "nobody"
    assert changes == [":1.7", None]


@pytest.mark.asyncio
async def test_preparing_for_sleep_is_false_when_it_cannot_be_read() -> None:
    bus: Any = FakeBus()

    async def nothing(*args: Any) -> None:
        pass

    logind = Logind(
        bus,
        on_prepare_for_sleep=nothing,
        on_change=lambda: None,
        on_owner_change=nothing,
        timeout=1.0,
    )
    assert await logind.preparing_for_sleep() is False  # no owner
    logind.owner = ":1.1"
    assert await logind.preparing_for_sleep() is False  # the call fails
