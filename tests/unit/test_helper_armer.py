"""The daemon's helper armer (cryptlockd/daemon/helper_armer.py).

Starting the idle helper: StartUnit must wait until systemd has seen the last helper go.
Until systemd reaps an exited helper its unit is still active, and StartUnit on an active
unit does nothing (the guest showed a sleep right after a cycle going unprotected)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from cryptlockd.daemon import helper_socket
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.daemon.helper_armer import HelperArmer, HelperError
from cryptlockd.daemon.helper_messages import device_plan, merge_record
from cryptlockd.daemon.ramfs import Ramfs
from cryptlockd.daemon.repair import repair


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
    monkeypatch.setattr(helper_socket, "alive", lambda path: alive)
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


def test_device_plan_root_takes_passphrase() -> None:
    devs = [
        LuksDevice("root", "u1", "LUKS2", "/dev/vda", True, False, "keyfile:/etc/keys/root.key"),
        LuksDevice("data", "u2", "LUKS2", "/dev/vdb", False, False, "keyfile:/etc/keys/d.key"),
    ]
    plan = {d["name"]: d["key_source"] for d in device_plan(devs)}
    assert plan == {"root": "passphrase", "data": "keyfile:/etc/keys/d.key"}


def test_device_plan_carries_keyfile_size_and_offset() -> None:
    devs = [
        LuksDevice(
            "root",
            "u1",
            "LUKS2",
            "/dev/vda",
            True,
            False,
            "keyfile:/r.key",
            keyfile_size=32,
            keyfile_offset=8,
        ),
        LuksDevice(
            "data",
            "u2",
            "LUKS2",
            "/dev/vdb",
            False,
            False,
            "keyfile:/d.key",
            keyfile_size=64,
            keyfile_offset=4096,
        ),
    ]
    plan = {str(d["name"]): (d["keyfile_size"], d["keyfile_offset"]) for d in device_plan(devs)}
    # The root's keyfile is never read (it takes the passphrase), so neither are its options.
    assert plan == {"root": (0, 0), "data": (64, 4096)}


def test_merge_record_puts_daemon_steps_first() -> None:
    rec = {"started_boottime": 100.0, "timeline_ms": {"helper_arm": 0.0, "finished": 900.0}}
    out = merge_record(
        rec, {"arm_requested": 99.5, "armed": 100.2}, {"reserve_kib": 65536, "vt": 8}
    )
    assert list(out["timeline_ms"]) == ["arm_requested", "helper_arm", "armed", "finished"]
    assert out["timeline_ms"]["finished"] == 1400.0 and out["arm_seconds"] == 0.7


def test_repair_thaws_and_restores(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    for name in ("system.slice", "user.slice"):
        (cg / name).mkdir(parents=True)
        (cg / name / "cgroup.freeze").write_text("1")
    state = tmp_path / "ramfs" / "state"
    state.mkdir(parents=True)
    (state / "frozen").write_text("/system.slice\n/user.slice\n")
    (state / "sync_on_suspend").write_text("1\n")
    sync = tmp_path / "sync_on_suspend"
    sync.write_text("0")
    done = repair(tmp_path / "ramfs", str(tmp_path / "no.sock"), str(cg), str(sync))
    assert len(done) == 2
    assert (cg / "user.slice/cgroup.freeze").read_text() == "0"
    assert sync.read_text() == "1" and not (state / "frozen").exists()
    assert repair(tmp_path / "ramfs", str(tmp_path / "no.sock"), str(cg), str(sync)) == []
