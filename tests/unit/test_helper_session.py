"""The helper's session (cryptlockd/helper/session.py).

The idle helper opens the LUKS mappings ahead of time; arming reuses a handle only while
its mapping is the same one (by dm UUID), and frees every handle it does not use."""

from __future__ import annotations

import socket
import time
from collections.abc import Iterator
from typing import ClassVar

import pytest

from cryptlockd.helper import mappings, protocol, session
from cryptlockd.helper.cycle import DevicePlan
from cryptlockd.helper.libcryptsetup import UnsupportedDevice


def plan(*names: str, header: str = "") -> list[DevicePlan]:
    return [DevicePlan(n, "passphrase", header=header) for n in names]


class FakeDevice:
    opened: ClassVar[list[str]] = []
    freed: ClassVar[list[str]] = []
    fail: ClassVar[set[str]] = set()
    # name -> the header it opens only with (a detached header)
    headers: ClassVar[dict[str, str]] = {}

    def __init__(self, library: object, name: str, header: str = "") -> None:
        if name in self.fail:
            raise OSError(f"cannot open {name}")
        if self.headers.get(name, "") != header:
            raise UnsupportedDevice(f"{name}: no LUKS header found (a detached header?)")
        self.name = name
        self.opened.append(name + (f" with {header}" if header else ""))
        self.last_keyslot = -1

    def free(self) -> None:
        self.freed.append(self.name)


@pytest.fixture
def helper(monkeypatch: pytest.MonkeyPatch) -> session.Helper:
    FakeDevice.opened, FakeDevice.freed, FakeDevice.fail = [], [], set()
    FakeDevice.headers = {}
    monkeypatch.setattr(session, "Device", FakeDevice)
    h = session.Helper()
    h.library = object()  # type: ignore[assignment]
    return h


def test_arming_reuses_unchanged_preloaded_mappings(
    helper: session.Helper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        mappings,
        "luks_mappings",
        lambda: {
            "root": "CRYPT-LUKS2-aaaa-root",
            "data": "CRYPT-LUKS2-bbbb-data",
            "spare": "CRYPT-LUKS2-cccc-spare",
        },
    )
    helper.preload()
    assert FakeDevice.opened == ["root", "data", "spare"]
    # data was closed and opened again on another disk; spare is not in the plan.
    monkeypatch.setattr(
        mappings,
        "luks_mappings",
        lambda: {
            "root": "CRYPT-LUKS2-aaaa-root",
            "data": "CRYPT-LUKS2-dddd-data",
            "spare": "CRYPT-LUKS2-cccc-spare",
            "new": "CRYPT-LUKS2-eeee-new",
        },
    )
    taken = helper._take_devices(plan("root", "data", "new"), mappings.luks_mappings())
    assert list(taken) == ["root", "data", "new"]
    assert FakeDevice.opened == ["root", "data", "spare", "data", "new"]
    assert sorted(FakeDevice.freed) == ["data", "spare"]
    assert helper.preloaded == {}


def test_a_device_that_cannot_be_opened_fails_the_arm_and_leaks_nothing(
    helper: session.Helper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mappings, "luks_mappings", lambda: {"root": "CRYPT-LUKS2-aaaa-root"})
    helper.preload()
    FakeDevice.fail = {"data"}
    with pytest.raises(OSError, match="cannot open data"):
        helper._take_devices(plan("root", "data"), mappings.luks_mappings())
    assert FakeDevice.freed == ["root"]


def test_a_failed_preload_is_left_for_the_arm(
    helper: session.Helper, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(mappings, "luks_mappings", lambda: {"root": "CRYPT-LUKS2-aaaa-root"})
    FakeDevice.fail = {"root"}
    helper.preload()
    assert helper.preloaded == {} and "preloading root" in capsys.readouterr().err
    FakeDevice.fail = set()
    assert list(helper._take_devices(plan("root"), mappings.luks_mappings())) == ["root"]


def test_a_detached_header_is_opened_with_its_header_on_the_real_root(
    helper: session.Helper, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(mappings, "luks_mappings", lambda: {"bare": "CRYPT-LUKS2-aaaa-bare"})
    FakeDevice.headers = {"bare": "/proc/1/root/etc/hdr/bare"}
    helper.preload()  # without its header it cannot open: left for the arm, quietly
    assert helper.preloaded == {}
    taken = helper._take_devices(plan("bare", header="/etc/hdr/bare"), mappings.luks_mappings())
    assert list(taken) == ["bare"]
    assert FakeDevice.opened == ["bare with /proc/1/root/etc/hdr/bare"]


def test_an_untyped_context_leaves_the_device_out_unprotected_and_says_so(
    helper: session.Helper, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    # A detached header crypttab does not name (or cannot be read): crypt_init_by_name
    # succeeds with no type. Suspending it would be a resume that never works.
    monkeypatch.setattr(mappings, "luks_mappings", lambda: {})
    FakeDevice.headers = {"bare": "/somewhere"}
    p = plan("root", "bare")
    taken = helper._take_devices(p, mappings.luks_mappings())
    assert list(taken) == ["root"] and [d.name for d in p] == ["root"]
    assert helper.record.verification["bare"]["protected"] == "no"
    [problem] = helper.record.problems
    assert problem.startswith("bare: no LUKS header found") and "NOT suspended" in problem
    assert "NOT suspended" in capsys.readouterr().err


@pytest.fixture
def armed_helper(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[session.Helper, socket.socket]]:
    """A helper whose daemon connection is one end of a socket pair; the test holds the
    other, and the wait for the daemon's `watchdogs_off` is 0.3 s."""
    monkeypatch.setattr(protocol, "WATCHDOGS_WAIT", 0.3)
    ours, theirs = socket.socketpair()
    h = session.Helper()
    h.daemon = protocol.Channel(ours)
    h.watchdogs_pending = True
    yield h, theirs
    ours.close()
    theirs.close()


def test_the_freeze_waits_for_the_daemons_watchdogs_off(
    armed_helper: tuple[session.Helper, socket.socket],
) -> None:
    # A late `disarm` has no say mid-cycle; `watchdogs_off` ends the wait.
    h, daemon = armed_helper
    daemon.sendall(protocol.encode({"op": protocol.OP_DISARM}))
    daemon.sendall(protocol.encode({"op": protocol.OP_WATCHDOGS_OFF}))
    h.wait_watchdogs()
    assert not h.watchdogs_pending and h.daemon is not None
    h.wait_watchdogs()  # once said, never waited for again


def test_the_sleep_state_read_again_comes_with_watchdogs_off(
    armed_helper: tuple[session.Helper, socket.socket],
) -> None:
    # The arm went out with the state read for the last sleep (issue 12); the daemon's
    # read for this one, when it differs, comes before anything is frozen.
    h, daemon = armed_helper
    h.sleep_state, h.mem_sleep = "mem", "deep"
    daemon.sendall(
        protocol.encode(
            {"op": protocol.OP_WATCHDOGS_OFF, "sleep_state": "freeze", "mem_sleep": None}
        )
    )
    h.wait_watchdogs()
    assert (h.sleep_state, h.mem_sleep, h.record.sleep_state) == ("freeze", None, "freeze")
    h.watchdogs_pending = True
    daemon.sendall(protocol.encode({"op": protocol.OP_WATCHDOGS_OFF}))
    h.wait_watchdogs()
    assert (h.sleep_state, h.mem_sleep) == ("freeze", None)  # no news: unchanged


def test_a_daemon_that_never_says_it_costs_the_wait_and_an_error(
    armed_helper: tuple[session.Helper, socket.socket],
) -> None:
    h, _ = armed_helper
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="service watchdogs are off"):
        h.wait_watchdogs()
    assert 0.25 < time.monotonic() - t0 < 5.0
    assert not h.watchdogs_pending


def test_a_daemon_that_went_away_is_not_waited_for(
    armed_helper: tuple[session.Helper, socket.socket],
) -> None:
    h, daemon = armed_helper
    daemon.close()
    h.wait_watchdogs()
    assert h.daemon is None and not h.watchdogs_pending


def test_without_a_pending_switch_nothing_is_read(
    armed_helper: tuple[session.Helper, socket.socket],
) -> None:
    # Lock(), or an older daemon: the watchdogs were off before the arm, or nobody says.
    h, daemon = armed_helper
    h.watchdogs_pending = False
    daemon.sendall(protocol.encode({"op": protocol.OP_DISARM}))
    h.wait_watchdogs()
    assert h.daemon is not None and h.daemon.receive(1.0) == {"op": "disarm"}


class FakeTerminal:
    def switch_back(self) -> None:
        pass


def test_the_record_has_the_keyslot_that_opened_each_device_and_every_one_tried(
    helper: session.Helper,
) -> None:
    root, data, swap = (FakeDevice(None, n) for n in ("root", "data", "swap"))
    root.last_keyslot, root.tried = 2, [0, 1, 2]  # type: ignore[attr-defined]
    data.last_keyslot, data.tried = 1, [1]  # type: ignore[attr-defined]
    swap.tried = []  # type: ignore[attr-defined]  # by keyfile: no passphrase tried
    helper.devices = {"root": root, "data": data, "swap": swap}  # type: ignore[dict-item]
    helper._terminal = FakeTerminal()  # type: ignore[assignment]
    helper.finish(None)
    rec = helper.record.as_dict()
    assert rec["keyslots"] == {"root": 2, "data": 1}
    assert rec["keyslots_tried"] == {"root": [0, 1, 2], "data": [1]}
    assert not rec["problems"]
