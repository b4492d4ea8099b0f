"""The daemon's helper armer (cryptlockd/daemon/helper_armer.py) and what it uses: the arm
message's contents (helper_messages.py), the helper's socket (helper_socket.py) and the
repair at start (repair.py).

Starting the idle helper: StartUnit must wait until systemd has seen the last helper go.
Until systemd reaps an exited helper its unit is still active, and StartUnit on an active
unit does nothing (the guest showed a sleep right after a cycle going unprotected)."""

from __future__ import annotations

import asyncio
import os
import socket
import threading
import time
from collections.abc import Collection
from pathlib import Path

import pytest

from cryptlockd.daemon import helper_socket
from cryptlockd.daemon.config import Config
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.daemon.helper_armer import HelperArmer, HelperError, poll_until
from cryptlockd.daemon.helper_messages import device_plan, merge_record
from cryptlockd.daemon.ramfs import Ramfs
from cryptlockd.daemon.repair import repair


class FakeUnit:
    """systemd's view of the helper unit: one state per read, and a change after each."""

    name = "cryptlockd-helper.service"

    def __init__(self, states: list[str]) -> None:
        self.states = states
        self.calls: list[str] = []
        self.reads = 0

    def next_change(self) -> asyncio.Event:
        changed = asyncio.Event()
        if len(self.states) > 1:
            changed.set()  # the state read next differs
        return changed

    async def active_state(self) -> str:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        self.calls.append(state)
        return state

    async def start(self) -> None:
        self.calls.append("StartUnit")

    async def stop(self) -> None:
        self.calls.append("StopUnit")

    async def wait_while(self, states: Collection[str], deadline: float) -> str:
        while (state := await self.active_state()) in states and time.monotonic() < deadline:
            await asyncio.sleep(0)
        return state


def armer(
    tmp_path: Path, fake: FakeUnit, monkeypatch: pytest.MonkeyPatch, alive: bool = False
) -> HelperArmer:
    a = HelperArmer(
        None,  # type: ignore[arg-type]  # the fake unit makes every call
        ramfs=Ramfs(str(tmp_path / "ramfs"), mount=False),
        socket_path=str(tmp_path / "s"),
        under_systemd=True,
    )
    a.unit = fake  # type: ignore[assignment]
    monkeypatch.setattr(helper_socket, "alive", lambda path: alive)
    return a


@pytest.mark.asyncio
async def test_start_waits_until_the_exited_helper_is_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUnit(["active", "active", "deactivating", "inactive"])
    await armer(tmp_path, fake, monkeypatch)._start_unit(time.monotonic() + 5)
    assert fake.calls == ["active", "active", "deactivating", "inactive", "StartUnit"]


@pytest.mark.asyncio
async def test_a_listening_helper_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUnit(["active"])
    await armer(tmp_path, fake, monkeypatch, alive=True)._start_unit(time.monotonic() + 5)
    assert "StartUnit" not in fake.calls


@pytest.mark.asyncio
async def test_a_helper_that_starts_listening_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Type=simple: the unit is active at once, the helper listens a little later, and
    # systemd announces nothing in between. The socket is watched for that.
    fake = FakeUnit(["active"])
    a = armer(tmp_path, fake, monkeypatch)
    looks = iter([False, False, True])
    monkeypatch.setattr(helper_socket, "alive", lambda path: next(looks))
    await a._start_unit(time.monotonic() + 5)
    assert fake.calls == ["active"]


@pytest.mark.asyncio
async def test_a_unit_that_stays_active_without_a_helper_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUnit(["active"])
    with pytest.raises(HelperError, match="still active"):
        await armer(tmp_path, fake, monkeypatch)._start_unit(time.monotonic() + 0.2)
    assert "StartUnit" not in fake.calls


@pytest.mark.asyncio
async def test_after_a_cycle_the_idle_helper_starts_once_the_unit_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUnit(["active", "inactive"])
    await armer(tmp_path, fake, monkeypatch)._prestart(after_exit=True)
    assert fake.calls == ["active", "inactive", "inactive", "StartUnit"]


@pytest.mark.asyncio
async def test_poll_until_stops_at_the_deadline_or_the_event() -> None:
    tries = 0

    async def never() -> int | None:
        nonlocal tries
        tries += 1
        return None

    t0 = time.monotonic()
    assert await poll_until(never, t0 + 0.1, every=0.01) is None
    assert time.monotonic() - t0 >= 0.1 and tries > 2
    changed = asyncio.Event()
    asyncio.get_running_loop().call_later(0.05, changed.set)
    t0 = time.monotonic()
    assert await poll_until(never, t0 + 10, every=5.0, unless=changed) is None
    assert time.monotonic() - t0 < 5

    async def soon() -> str | None:
        return "yes" if time.monotonic() - t0 > 0.05 else None

    t0 = time.monotonic()
    assert await poll_until(soon, t0 + 10, every=0.01) == "yes"


def test_stop_idle_waits_for_the_helper_to_go(tmp_path: Path) -> None:
    path = str(tmp_path / "helper.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(4)
    got: list[bytes] = []

    def idle_helper() -> None:
        conn, _ = listener.accept()
        got.append(conn.recv(4096))
        listener.close()  # the helper's finally, then its exit closes the rest
        os.unlink(path)
        conn.close()

    t = threading.Thread(target=idle_helper)
    t.start()
    assert helper_socket.stop_idle(path, timeout=5.0)
    t.join()
    assert got == [b'{"op":"disarm"}\n']
    assert not helper_socket.alive(path)


def test_stop_idle_gives_up_on_a_busy_helper(tmp_path: Path) -> None:
    path = str(tmp_path / "helper.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as listener:
        listener.bind(path)
        listener.listen(4)  # accepts through the backlog, never reads: mid-cycle
        t0 = time.monotonic()
        assert not helper_socket.stop_idle(path, timeout=0.2)
        assert time.monotonic() - t0 >= 0.2


def test_without_systemd_nothing_is_built_or_armed(tmp_path: Path) -> None:
    a = HelperArmer(
        None,  # type: ignore[arg-type]
        ramfs=Ramfs(str(tmp_path / "ramfs"), mount=False),
        socket_path=str(tmp_path / "s"),
        under_systemd=False,
    )
    a.configure(Config())
    assert a._builder is None
    [line] = a.status()
    assert line.name == "helper" and not line.ok
    assert (
        line.detail == "not running under systemd (no /run/systemd/system): nothing would be wiped"
    )
    with pytest.raises(HelperError, match="not running under systemd"):
        asyncio.run(a.arm([], lambda ok, record: None))


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
