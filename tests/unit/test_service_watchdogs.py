"""systemd's service watchdogs off for a cycle (cryptlockd/daemon/service_watchdogs.py): the
value replaced is noted first and is what comes back, at idle or at the next start; a
failure never raises and keeps the note for the next try."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptlockd.daemon.service_watchdogs import PROPERTY, STATE_FILE, ServiceWatchdogs
from cryptlockd.errors import RemoteError


class FakeSystemd:
    """ServiceWatchdogs of a fake PID 1; `fail` makes every call an error reply."""

    def __init__(self, value: bool = True) -> None:
        self.value = value
        self.fail: str | None = None
        self.sets: list[bool] = []

    def _check(self) -> None:
        if self.fail:
            raise RemoteError("org.freedesktop.systemd1", self.fail, "refused")

    async def get(self, name: str) -> object:
        assert name == PROPERTY
        self._check()
        return self.value

    async def set(self, name: str, signature: str, value: object) -> None:
        assert (name, signature) == (PROPERTY, "b")
        self._check()
        assert isinstance(value, bool)
        self.value = value
        self.sets.append(value)


def knob(tmp_path: Path, systemd: FakeSystemd) -> ServiceWatchdogs:
    return ServiceWatchdogs(systemd, tmp_path / STATE_FILE.lstrip("/"))


@pytest.mark.asyncio
async def test_off_for_the_cycle_then_back_on(tmp_path: Path) -> None:
    systemd = FakeSystemd(True)
    w = knob(tmp_path, systemd)
    await w.disable()
    assert systemd.value is False
    assert w.state_file.read_text() == "yes\n"
    await w.restore()
    assert systemd.value is True
    assert not w.state_file.exists()
    # Nothing noted: a second restore changes nothing.
    await w.restore()
    assert systemd.sets == [False, True]


@pytest.mark.asyncio
async def test_a_user_who_turned_them_off_finds_them_off(tmp_path: Path) -> None:
    systemd = FakeSystemd(False)
    w = knob(tmp_path, systemd)
    await w.disable()
    await w.restore()
    assert systemd.value is False
    assert systemd.sets == []
    assert not w.state_file.exists()


@pytest.mark.asyncio
async def test_a_daemon_restarted_mid_cycle_restores_the_noted_value(tmp_path: Path) -> None:
    systemd = FakeSystemd(True)
    await knob(tmp_path, systemd).disable()
    # The daemon died; the new one starts with the note in /run.
    again = knob(tmp_path, systemd)
    await again.restore()
    assert systemd.value is True and not again.state_file.exists()


@pytest.mark.asyncio
async def test_a_second_disable_keeps_the_first_note(tmp_path: Path) -> None:
    """A cycle after one whose restore failed: the value read now is our own "off", so the
    note of the value before it must stay."""
    systemd = FakeSystemd(True)
    w = knob(tmp_path, systemd)
    await w.disable()
    await w.disable()
    assert w.state_file.read_text() == "yes\n"
    await w.restore()
    assert systemd.value is True


@pytest.mark.asyncio
async def test_a_failed_restore_keeps_the_note_and_the_next_one_works(tmp_path: Path) -> None:
    systemd = FakeSystemd(True)
    w = knob(tmp_path, systemd)
    await w.disable()
    systemd.fail = "org.freedesktop.DBus.Error.Timeout"
    await w.restore()  # logged, not raised
    assert systemd.value is False and w.state_file.exists()
    systemd.fail = None
    await w.restore()
    assert systemd.value is True and not w.state_file.exists()


@pytest.mark.asyncio
async def test_a_failed_disable_changes_nothing_and_does_not_raise(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    systemd = FakeSystemd(True)
    systemd.fail = "org.freedesktop.DBus.Error.AccessDenied"
    w = knob(tmp_path, systemd)
    await w.disable()
    assert systemd.value is True and not w.state_file.exists()
    assert "may get frozen services killed" in caplog.text


@pytest.mark.asyncio
async def test_a_set_refused_after_the_note_is_undone_by_restore(tmp_path: Path) -> None:
    """Noted, then the Set failed: restore puts back the value that is there anyway."""

    class SetFails(FakeSystemd):
        async def set(self, name: str, signature: str, value: object) -> None:
            if value is False:
                raise RemoteError("org.freedesktop.systemd1", "x.AccessDenied", "no")
            await super().set(name, signature, value)

    systemd = SetFails(True)
    w = knob(tmp_path, systemd)
    await w.disable()
    assert w.state_file.exists()
    await w.restore()
    assert systemd.value is True and not w.state_file.exists()


@pytest.mark.asyncio
async def test_an_unreadable_note_restores_the_default(tmp_path: Path) -> None:
    systemd = FakeSystemd(False)
    w = knob(tmp_path, systemd)
    w.state_file.parent.mkdir(parents=True)
    w.state_file.write_text("garbage")
    await w.restore()
    assert systemd.value is True and not w.state_file.exists()
