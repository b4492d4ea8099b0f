"""Starting the idle helper: StartUnit must wait until systemd has seen the last helper go.
Until systemd reaps an exited helper its unit is still active, and StartUnit on an active
unit does nothing (the guest showed a sleep right after a cycle going unprotected)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cryptlockd.daemon import helper_armer
from cryptlockd.daemon.helper_armer import HelperArmer, HelperError
from cryptlockd.daemon.ramfs import Ramfs


class FakeSystemd:
    def __init__(self, states: list[str]) -> None:
        self.states = states
        self.calls: list[str] = []

    async def unit_state(self) -> str:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        self.calls.append(state)
        return state

    async def systemd(self, member: str, mode: str = "replace") -> None:
        self.calls.append(member)


def armer(
    tmp_path: Path, fake: FakeSystemd, monkeypatch: pytest.MonkeyPatch, alive: bool = False
) -> HelperArmer:
    a = HelperArmer(Ramfs(str(tmp_path / "ramfs"), mount=False), socket_path=str(tmp_path / "s"))
    monkeypatch.setattr(a, "_unit_state", fake.unit_state)
    monkeypatch.setattr(a, "_systemd", fake.systemd)
    monkeypatch.setattr(helper_armer, "_helper_alive", lambda path: alive)
    return a


@pytest.mark.asyncio
async def test_start_waits_until_the_exited_helper_is_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeSystemd(["active", "active", "deactivating", "inactive"])
    await armer(tmp_path, fake, monkeypatch)._start_unit(time.monotonic() + 5)
    assert fake.calls == ["active", "active", "deactivating", "inactive", "StartUnit"]


@pytest.mark.asyncio
async def test_a_listening_helper_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeSystemd(["active"])
    await armer(tmp_path, fake, monkeypatch, alive=True)._start_unit(time.monotonic() + 5)
    assert "StartUnit" not in fake.calls


@pytest.mark.asyncio
async def test_a_unit_that_stays_active_without_a_helper_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeSystemd(["active"])
    with pytest.raises(HelperError, match="still active"):
        await armer(tmp_path, fake, monkeypatch)._start_unit(time.monotonic() + 0.2)
    assert "StartUnit" not in fake.calls
