"""The recovery of a dead helper (cryptlockd/helper/recover.py), run against fake devices, a
fake VT and a cgroup tree in a temporary directory: what it finds, what it resumes, and that
its record is in place before the thaw lets the daemon run."""

from __future__ import annotations

import ctypes
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import ClassVar

import pytest

from cryptlockd.helper import cgroups, hardening, mappings, power, protocol, recover, system_ops, vt
from cryptlockd.helper.cycle import DevicePlan
from cryptlockd.helper.recover import Leftovers, death_reason
from cryptlockd.helper.secret import SecretBuffer

GOOD = b"Lid-Shut_Tight!42"

PLAN = [
    DevicePlan("root", "passphrase").as_dict(),
    DevicePlan("data", "keyfile:/etc/keys/data.key", essential=False, after=["root"]).as_dict(),
]


def test_leftovers_are_what_the_state_says_and_the_system_confirms() -> None:
    state = {"plan": PLAN, "suspended": ["root", "data"]}
    left = Leftovers(state, ["/system.slice", "/user.slice"], "1", {"data"}, {"/user.slice"}, "0")
    assert left.suspended == ["data"] and left.frozen == ["/user.slice"]
    assert left.saved_sync == "1" and left.anything()
    assert left.saved_rcu is None


def test_rcu_expedited_left_on_is_a_leftover_and_one_put_back_is_not() -> None:
    # Died with the suspends under way: rcu_expedited saved as 0, now 1.
    assert Leftovers(None, [], None, set(), set(), "1", "0", "1").saved_rcu == "0"
    assert Leftovers(None, [], None, set(), set(), "1", "0", "1").anything()
    assert not Leftovers(None, [], None, set(), set(), "1", "0", "0").anything()
    assert not Leftovers(None, [], None, set(), set(), "1", "0", None).anything()


def test_after_a_normal_exit_there_is_nothing_to_recover() -> None:
    assert not Leftovers(None, [], None, set(), set(), "1").anything()
    # The files of a cycle that thawed, or a device noted but never suspended.
    state = {"plan": PLAN, "suspended": ["root"]}
    assert not Leftovers(state, ["/system.slice"], "1", set(), set(), "1").anything()


@pytest.mark.parametrize(
    "env,how",
    [
        ({"EXIT_CODE": "killed", "EXIT_STATUS": "KILL"}, "killed by SIGKILL"),
        ({"EXIT_CODE": "dumped", "EXIT_STATUS": "SEGV"}, "crashed (SIGSEGV, core dumped)"),
        ({"EXIT_CODE": "exited", "EXIT_STATUS": "1"}, "exited with status 1"),
        ({}, "stopped"),
    ],
)
def test_the_reason_says_how_the_helper_died(env: dict[str, str], how: str) -> None:
    assert death_reason(env) == f"the helper died mid-cycle ({how}); recovered"


class FakeLibrary:
    messages: ClassVar[list[str]] = []

    def has(self, symbol: str) -> bool:
        return False  # no token API: the prompt tries no TPM2 PIN (helper/token.py)


class FakeDevice:
    resumed: ClassVar[list[str]] = []

    def __init__(self, library: FakeLibrary, name: str, header: str = "") -> None:
        self.library = library
        self.name = name
        self.last_keyslot = -1

    def reload(self) -> None:
        pass

    def resume_by_passphrase(
        self,
        address: int,
        length: int,
        budget: object = None,
        on_derived: Callable[[], None] | None = None,
    ) -> bool:
        if ctypes.string_at(address, length) != GOOD:
            return False
        if on_derived is not None:
            on_derived()
        FakeDevice.resumed.append(self.name)
        return True

    def resume_by_keyfile(self, path: str, size: int = 0, offset: int = 0) -> None:
        FakeDevice.resumed.append(f"{self.name} by keyfile {path}")


class FakeTerminal:
    typed: ClassVar[list[bytes]] = []
    shown: ClassVar[list[str]] = []

    def __init__(self, number: int) -> None:
        self.number = number
        self.original = number

    def write(self, text: str) -> None:
        FakeTerminal.shown.append(text)

    def read_secret(
        self, secret: SecretBuffer, give_up: object = None, ready: Callable[[], None] | None = None
    ) -> bool:
        if ready is not None:
            ready()
        phrase = FakeTerminal.typed.pop(0)
        secret.view()[: len(phrase)] = phrase
        secret.length = len(phrase)
        return True

    def flush_input(self) -> None:
        pass

    def reopen(self) -> None:
        FakeTerminal.shown.append("<reopened>")

    def switch_to(self) -> None:
        FakeTerminal.shown.append(f"<switched to {self.number}>")

    def switch_back(self) -> None:
        FakeTerminal.shown.append(f"<switched back to {self.original}>")


@pytest.fixture
def system(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    for name, path in (
        ("CYCLE_STATE_IN_RAMFS", "cycle.json"),
        ("FROZEN_STATE_IN_RAMFS", "frozen"),
        ("SYNC_STATE_IN_RAMFS", "sync_on_suspend"),
        ("RCU_STATE_IN_RAMFS", "rcu_expedited"),
        ("RECOVERED_RECORD_IN_RAMFS", "recovered.json"),
        ("RECOVERY_LOCK_IN_RAMFS", "recovery.lock"),
        ("LOGLEVEL_STATE_IN_RAMFS", "console_loglevel"),
    ):
        monkeypatch.setattr(protocol, name, str(state / path))
    cg = tmp_path / "cg"
    for name in ("system.slice", "user.slice"):
        (cg / name).mkdir(parents=True)
        (cg / name / "cgroup.freeze").write_text("1")
    monkeypatch.setattr(cgroups, "CGROUP_ROOT", str(cg))
    (tmp_path / "sync").write_text("0")
    monkeypatch.setattr(power, "SYNC_ON_SUSPEND", str(tmp_path / "sync"))
    (tmp_path / "rcu").write_text("0")
    monkeypatch.setattr(power, "RCU_EXPEDITED", str(tmp_path / "rcu"))
    # The prompt lowers the console loglevel while it waits: not the host's.
    (tmp_path / "printk").write_text("7\t4\t1\t7\n")
    monkeypatch.setattr(vt, "PRINTK", str(tmp_path / "printk"))
    monkeypatch.setattr(mappings, "suspended_mappings", lambda: {"root", "data"})
    monkeypatch.setattr(mappings, "backing_present", lambda name: True)
    # Not in the test process: its children (the daemon under test) would inherit it.
    monkeypatch.setattr(recover, "ignore_stop_signals", lambda: None)
    monkeypatch.setattr(recover, "harden", lambda: None)
    monkeypatch.setattr(hardening, "lock_on_fault", lambda: None)
    monkeypatch.setattr(recover, "hardening_status", lambda: {"dumpable": "0"})
    monkeypatch.setattr(recover, "Library", FakeLibrary)
    monkeypatch.setattr(recover, "Device", FakeDevice)
    monkeypatch.setattr(recover, "Terminal", FakeTerminal)
    monkeypatch.setattr(system_ops, "notice_console", lambda text: None)
    FakeDevice.resumed = []
    FakeTerminal.typed, FakeTerminal.shown = [], []
    return tmp_path


def _dead_cycle(tmp: Path, suspended: list[str]) -> None:
    state = {
        "plan": PLAN,
        "suspended": suspended,
        "vt": 8,
        "vt_original": 2,
        "backoff_initial": 0.0,
        "backoff_max": 0.0,
        "poweroff_after": 0,
        "keyslots": {"root": 1},
    }
    (tmp / "state/cycle.json").write_text(json.dumps(state))
    (tmp / "state/frozen").write_text("/system.slice\n/user.slice\n")
    (tmp / "state/sync_on_suspend").write_text("1\n")
    if suspended:  # died mid-suspends, rcu_expedited on (cycle._suspend_all)
        (tmp / "state/rcu_expedited").write_text("0\n")
        (tmp / "rcu").write_text("1")


def test_a_normal_exit_leaves_nothing_and_the_recovery_does_nothing(system: Path) -> None:
    for name in ("system.slice", "user.slice"):
        (system / "cg" / name / "cgroup.freeze").write_text("0")
    (system / "sync").write_text("1")
    assert recover.recover({"EXIT_CODE": "exited", "EXIT_STATUS": "0"}) == 0
    assert FakeTerminal.shown == [] and not (system / "state/recovered.json").exists()


def test_a_dead_helper_is_recovered_record_first_then_thawed(
    system: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dead_cycle(system, ["root", "data"])
    FakeTerminal.typed = [GOOD]
    thaw = cgroups.thaw
    seen: list[bool] = []

    def checking_thaw(root: str, frozen: list[str]) -> list[str]:
        # The daemon runs again the moment this thaw is done: its record must be there.
        seen.append((system / "state/recovered.json").exists())
        return thaw(root, frozen)

    monkeypatch.setattr(cgroups, "thaw", checking_thaw)
    assert recover.recover({"EXIT_CODE": "killed", "EXIT_STATUS": "KILL"}) == 0
    assert seen == [True]
    # The passphrase device first, then the keyfile device whose keyfile is on it.
    assert FakeDevice.resumed == ["root", "data by keyfile /proc/1/root/etc/keys/data.key"]
    assert FakeTerminal.shown[0] == "<switched to 8>" and FakeTerminal.shown[-1] == (
        "<switched back to 2>"
    )
    assert (system / "cg/user.slice/cgroup.freeze").read_text() == "0"
    assert (system / "sync").read_text() == "1" and (system / "rcu").read_text() == "0"
    assert sorted(os.listdir(system / "state")) == ["recovered.json", "recovery.lock"]
    rec = json.loads((system / "state/recovered.json").read_text())
    assert rec["reason"] == "the helper died mid-cycle (killed by SIGKILL); recovered"
    assert not rec["success"] and rec["suspended"] == ["root", "data"]
    assert rec["resumed"] == ["root", "data"] and rec["problems"] == []
    t = rec["timeline_ms"]
    assert (
        "recovery_start" in t and t["header_read:root"] <= t["prompt"] < t["passphrase_entered"]
    ), t
    assert t["header_read:root"] <= t["derived:root"] <= t["resumed:root"], t
    assert t["recovery_start"] <= t["rcu_restored"] <= t["prompt"], t


def test_a_helper_dead_after_the_freeze_is_thawed_without_a_prompt(system: Path) -> None:
    _dead_cycle(system, [])
    assert recover.recover({"EXIT_CODE": "killed", "EXIT_STATUS": "KILL"}) == 0
    assert FakeDevice.resumed == [] and not any("Passphrase" in s for s in FakeTerminal.shown)
    assert (system / "cg/system.slice/cgroup.freeze").read_text() == "0"
    assert (system / "sync").read_text() == "1"
    rec = json.loads((system / "state/recovered.json").read_text())
    assert rec["suspended"] == [] and "recovered" in rec["reason"]


def test_the_fault_hook_counts_only_a_root_file_and_serves_once(tmp_path: Path) -> None:
    hook = tmp_path / "debug-helper-fault"
    hook.write_text("at-prompt\n")
    hook.chmod(0o600)
    expected = "at-prompt" if os.getuid() == 0 else ""
    assert system_ops.read_fault_hook(str(hook)) == expected
    assert not hook.exists()
    assert system_ops.read_fault_hook(str(hook)) == ""


def test_a_device_that_will_not_open_is_left_out_unless_essential(
    system: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _dead_cycle(system, ["root", "data"])
    FakeTerminal.typed = [GOOD]
    failures = {"data": 1, "root": 2}
    sleeps: list[float] = []

    def device(library: FakeLibrary, name: str, header: str = "") -> FakeDevice:
        if failures.get(name):
            failures[name] -= 1
            raise OSError("ENODEV")
        return FakeDevice(library, name)

    monkeypatch.setattr(recover, "Device", device)
    monkeypatch.setattr(recover.time, "sleep", sleeps.append)
    assert recover.recover({"EXIT_CODE": "killed", "EXIT_STATUS": "KILL"}) == 0
    # root (essential) was tried until it opened; data (not essential) stays suspended.
    assert FakeDevice.resumed == ["root"] and sleeps == [2.0, 2.0]
    rec = json.loads((system / "state/recovered.json").read_text())
    assert "data stays suspended" in rec["problems"]
    assert rec["problems"].count("opening root: ENODEV") == 1
    assert (system / "cg/system.slice/cgroup.freeze").read_text() == "0"


def test_the_watchdog_recovers_once_the_helper_is_gone(monkeypatch: pytest.MonkeyPatch) -> None:
    r, w = os.pipe()
    ran: list[dict[str, str]] = []
    monkeypatch.setattr(recover, "recover", lambda env: ran.append(env) or 0)
    monkeypatch.setattr(recover, "harden", lambda: None)
    monkeypatch.setattr(recover, "ignore_stop_signals", lambda: None)
    os.write(w, b"x")  # anything before the end is no reason to act
    os.close(w)
    assert recover.watch(r) == 0 and ran == [{recover.WATCHDOG_ENV: "1"}]
    assert death_reason(ran[0]) == "the helper died mid-cycle; recovered by its watchdog"


def test_the_watchdog_is_a_fresh_process_with_only_its_pipe(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A stand-in helper with a socket open starts the watchdog and dies: the watchdog sees
    # the end of its pipe, and holds none of the helper's other files.
    marker = tmp_path / "watchdog"
    policy = tmp_path / "policy"
    script = (
        "import os, sys\n"
        f"open({str(policy)!r}, 'w').write(str(os.sched_getscheduler(0)))\n"
        "fd = int(sys.argv[1])\n"
        "while os.read(fd, 1): pass\n"
        f"open({str(marker)!r}, 'w').write(' '.join(sorted(os.listdir('/proc/self/fd'))))\n"
    )
    monkeypatch.setattr(recover, "WATCHDOG_ARGV", [sys.executable, "-c", script])
    sock_r, sock_w = os.pipe()
    helper = os.fork()
    if helper == 0:  # pragma: no cover - the stand-in helper
        try:
            recover.start_watchdog()
        finally:
            os._exit(0)
    os.waitpid(helper, 0)
    os.close(sock_r)
    os.close(sock_w)
    deadline = time.monotonic() + 20
    while not (marker.exists() and marker.read_text()) and time.monotonic() < deadline:
        time.sleep(0.01)
    fds = marker.read_text().split()
    # 0, 1, 2, the pipe, and the script's own two (the marker, listdir)
    assert str(sock_w) not in fds and len(fds) <= 6, fds
    # It starts on idle CPU time only: its start-up must not take a CPU from the sleep.
    assert policy.read_text() == str(os.SCHED_IDLE)


def test_the_watchdog_leaves_idle_priority_once_locked_in() -> None:
    # In a child: the test process keeps its own policy.
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
            before = os.sched_getscheduler(0)
            recover.leave_idle_priority()
            os.write(w, f"{before} {os.sched_getscheduler(0)}".encode())
        finally:
            os._exit(0)
    os.close(w)
    os.waitpid(pid, 0)
    with os.fdopen(r) as f:
        assert f.read() == f"{os.SCHED_IDLE} {os.SCHED_OTHER}"
