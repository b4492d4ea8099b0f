"""The recovery of a dead helper (SPEC 2.8), run by two watchers of the helper:

- its watchdog (start_watchdog), a child the helper forks when armed, before anything is
  suspended: it waits for the helper's end on a pipe. It needs nothing from anyone at that
  moment, which matters once root is suspended: PID 1 then cannot be relied on to start a
  process (seen in the guest: no ExecStopPost= while root was suspended);
- `python3 -I -S -B -m cryptlockd.helper --recover`, the helper unit's ExecStopPost=, which
  PID 1 runs after every stop of the helper, for a helper that died before it forked its
  watchdog, or a watchdog that died too.

Both run in the helper's RAM filesystem and cgroup, which the helper never freezes, so
they run whatever else is frozen, the daemon included; a lock in /state lets one work
while the other waits (and then finds nothing). After a normal exit or a stand-down there is nothing
left and it exits at once. After a death mid-cycle (SIGKILL, a crash in libcryptsetup, the
OOM killer) the state the helper wrote before each step (system_ops: the cycle state, the
frozen list, the saved sync_on_suspend) says what may be left; sysfs and cgroup.freeze say
what still is. It then runs the second half of the cycle, cycle.wind_down, with the same
SystemOps: the prompt on the helper's VT, the resume (bottom-up, essential devices never
left behind), sync_on_suspend, the thaw. The record goes to /state (RECOVERED_RECORD) just
before the thaw, so the daemon finds it when it runs again, and to the journal after.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import time

from cryptlockd.helper import cgroups, mappings, power, protocol, vt
from cryptlockd.helper.cycle import DevicePlan, essential_suspended, wind_down
from cryptlockd.helper.hardening import harden, hardening_status
from cryptlockd.helper.journal import INFO, WARNING, log
from cryptlockd.helper.libcryptsetup import Device, Library
from cryptlockd.helper.record import CycleRecord
from cryptlockd.helper.session import Helper
from cryptlockd.helper.system_ops import SystemOps, write_state
from cryptlockd.helper.vt import Terminal

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from typing import Any


class Leftovers:
    """What a dead cycle left, as read from its state files and the system now. Pure."""

    def __init__(
        self,
        state: dict[str, Any] | None,
        frozen_list: list[str],
        saved_sync: str | None,
        suspended_now: set[str],
        frozen_now: set[str],
        sync_now: str | None,
        saved_rcu: str | None = None,
        rcu_now: str | None = None,
    ) -> None:
        self.state = state or {}
        self.plan = [DevicePlan.from_dict(d) for d in self.state.get("plan", [])]
        noted = set(self.state.get("suspended", []))
        # In suspend order: wind_down resumes in reverse.
        self.suspended = [p.name for p in self.plan if p.name in noted and p.name in suspended_now]
        self.frozen = [c for c in frozen_list if c in frozen_now]
        self.saved_sync = saved_sync if saved_sync not in (None, "0") and sync_now == "0" else None
        # Died while the suspends had rcu_expedited on (cycle._suspend_all).
        self.saved_rcu = saved_rcu if saved_rcu and rcu_now not in (None, saved_rcu) else None

    def anything(self) -> bool:
        return bool(self.suspended or self.frozen or self.saved_sync or self.saved_rcu)


def _read_lines(path: str) -> list[str]:
    try:
        with open(path) as f:
            return [line for line in f.read().splitlines() if line]
    except FileNotFoundError:
        return []


def _frozen_now(candidates: list[str]) -> set[str]:
    out = set()
    for rel in candidates:
        path = os.path.join(cgroups.CGROUP_ROOT, rel.lstrip("/"), "cgroup.freeze")
        with contextlib.suppress(OSError), open(path) as f:
            if f.read().strip() == "1":
                out.add(rel)
    return out


def read_leftovers() -> Leftovers:
    state: dict[str, Any] | None = None
    with (
        contextlib.suppress(FileNotFoundError, ValueError),
        open(protocol.CYCLE_STATE_IN_RAMFS) as f,
    ):
        state = json.load(f)
    frozen_list = _read_lines(protocol.FROZEN_STATE_IN_RAMFS)
    saved = _read_lines(protocol.SYNC_STATE_IN_RAMFS)
    rcu = _read_lines(protocol.RCU_STATE_IN_RAMFS)
    return Leftovers(
        state,
        frozen_list,
        saved[0].strip() if saved else None,
        mappings.suspended_mappings() if state else set(),
        _frozen_now(frozen_list),
        power.get_sync_on_suspend(),
        rcu[0].strip() if rcu else None,
        power.get_rcu_expedited() if rcu else None,
    )


def _clean_state() -> None:
    for path in (
        protocol.CYCLE_STATE_IN_RAMFS,
        protocol.FROZEN_STATE_IN_RAMFS,
        protocol.SYNC_STATE_IN_RAMFS,
        protocol.RCU_STATE_IN_RAMFS,
    ):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)


def death_reason(env: dict[str, str]) -> str:
    """Why the helper stopped, from the variables PID 1 sets for ExecStopPost= (the
    watchdog, not its parent, cannot know how it died)."""
    if env.get(WATCHDOG_ENV):
        return "the helper died mid-cycle; recovered by its watchdog"
    code, status = env.get("EXIT_CODE", ""), env.get("EXIT_STATUS", "")
    if code == "killed":
        how = f"killed by SIG{status}"
    elif code == "dumped":
        how = f"crashed (SIG{status}, core dumped)"
    elif code == "exited":
        how = f"exited with status {status}"
    else:
        how = env.get("SERVICE_RESULT") or "stopped"
    return f"the helper died mid-cycle ({how}); recovered"


class RecoveryOps(SystemOps):
    """SystemOps with one difference: the record reaches /state before the thaw, so the
    daemon, which the thaw lets run again, finds it."""

    def __init__(self, helper: Helper, record: CycleRecord) -> None:
        super().__init__(helper)
        self.record = record

    def save_cycle_state(self) -> None:
        pass  # the helper's state stays as it was until the thaw removes it

    def thaw(self, frozen: list[str]) -> list[str]:
        # Not record.finish(): the dead helper's wipe verification died with it, and a
        # recovered cycle is a failed one whatever it verified.
        self.record.success = False
        self.record.step("recovery_record_written")
        write_state(protocol.RECOVERED_RECORD_IN_RAMFS, self.record.as_dict())
        errors = super().thaw(frozen)
        _clean_state()
        return errors


def _open_device(
    library: Library, name: str, left: Leftovers, record: CycleRecord
) -> Device | None:
    """The device, opened to be resumed. A device that will not open is left out if it is
    not essential (it stays suspended; the rest goes on); an essential one is tried again
    and again: giving up would leave the system frozen, thawing it would hang it."""
    essential = any(p.name == name and p.essential for p in left.plan)
    header = next((p.header for p in left.plan if p.name == name), "")
    while True:
        try:
            return Device(library, name, power.HOST_ROOT + header if header else "")
        except Exception as e:
            problem = f"opening {name}: {e}"
            if not record.problems or record.problems[-1] != problem:
                record.problems.append(problem)
            if not essential:
                record.problems.append(f"{name} stays suspended")
                return None
            time.sleep(2.0)


def _open_terminal(number: int, record: CycleRecord) -> Terminal:
    """The helper's VT, or else a free one."""
    try:
        return Terminal(number)
    except Exception as e:
        record.problems.append(f"VT {number}: {e}; prompting on a free VT")
        return Terminal(0)


def _helper_for(left: Leftovers, record: CycleRecord) -> Helper:
    """A Helper with what SystemOps needs for the second half: devices, VT, settings."""
    h = Helper()
    h.record = record
    h.plan = left.plan
    st = left.state
    h.backoff_initial = float(st.get("backoff_initial", protocol.DEFAULT_BACKOFF_INITIAL))
    h.backoff_max = float(st.get("backoff_max", protocol.DEFAULT_BACKOFF_MAX))
    h.poweroff_after = int(st.get("poweroff_after", protocol.DEFAULT_POWEROFF_AFTER))
    h.poweroff_locked_after = float(
        st.get("poweroff_locked_after", protocol.DEFAULT_POWEROFF_LOCKED_AFTER)
    )
    h.unanswered_wake_after = float(
        st.get("unanswered_wake_after", protocol.DEFAULT_UNANSWERED_WAKE_AFTER)
    )
    # A lock's recovery has no sleep to go back to either.
    h.sleeps = bool(st.get("sleeps", True))
    if left.suspended:
        h.library = Library()
        slots = st.get("keyslots", {})
        for name in left.suspended:
            dev = _open_device(h.library, name, left, record)
            if dev is None:
                continue
            if isinstance(slots.get(name), int):
                dev.last_keyslot = slots[name]
            h.devices[name] = dev
        left.suspended = [n for n in left.suspended if n in h.devices]
    if isinstance(st.get("vt"), int) and st["vt"] > 0:
        try:
            h._terminal = _open_terminal(st["vt"], record)
            # Now the helper's VT is the active one; the desktop's is the one to go back to.
            if isinstance(st.get("vt_original"), int):
                h._terminal.original = st["vt_original"]
        except Exception as e:
            if left.suspended:
                raise  # no VT, no prompt: the end of the process, not a thaw
            record.problems.append(f"VT {st['vt']}: {e}")
    if h._terminal is not None and left.suspended:
        with contextlib.suppress(Exception):
            h.terminal.switch_to()
        with contextlib.suppress(OSError):
            h.terminal.write("\n\ncryptlockd: the sleep-cycle helper died; recovering.\n")
    return h


def ignore_stop_signals() -> None:
    # Mid-cycle from here: nothing may stop us half-way (KillMode=process, SendSIGKILL=no,
    # TimeoutStopSec=infinity in the unit; these for the rest).
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, signal.SIG_IGN)


WATCHDOG_ENV = "CRYPTLOCKD_WATCHDOG"


# The watchdog's command line: the helper's own interpreter and package, in its RAM
# filesystem (a fresh process: a forked copy would lock in RAM a second copy of the
# helper's memory, the KDF reserve included).
WATCHDOG_ARGV = [sys.executable, "-I", "-S", "-B", "-m", "cryptlockd.helper", "--watchdog"]


def start_watchdog() -> int:
    """Starts the watchdog; returns its pid. It waits until the helper (this process) is
    gone, however it went, then runs recover(); after a normal end it finds nothing."""
    r, w = os.pipe()
    pid = os.fork()
    if pid:
        os.close(r)
        return pid  # w stays open for the helper's life: its end is the signal
    try:  # pragma: no cover - the child
        os.close(w)
        os.set_inheritable(r, True)
        # The helper's sockets above all: the daemon and the sleep entry must see the
        # helper's connections end when it dies.
        power.close_all_but(r)
        # Its start-up (the interpreter and every helper module: 0.3 s of CPU under TCG)
        # comes right after the arm, while logind starts the sleep entry and we sync and
        # suspend; at the helper's nice -10 it took a CPU from them (issue 12). It runs on
        # idle CPU time instead, and watch() leaves SCHED_IDLE once it is locked in memory.
        with contextlib.suppress(OSError):
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        os.execv(WATCHDOG_ARGV[0], [*WATCHDOG_ARGV, str(r)])
    finally:
        os._exit(1)


def leave_idle_priority() -> None:
    """Back to SCHED_OTHER, at the nice value inherited from the helper (start_watchdog)."""
    try:
        if os.sched_getscheduler(0) == os.SCHED_IDLE:
            os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))
    except OSError as e:
        # It still recovers, on what CPU time is idle: mid-cycle, nearly all of it.
        log(WARNING, f"the watchdog stays at idle priority: {e.strerror or e}")


def watch(fd: int) -> int:
    """The watchdog, after exec: locked in memory at once (were it swapped out to a swap
    on a suspended device, it could never run again), back to the helper's priority, then
    waits for the end of the pipe."""
    ignore_stop_signals()
    harden()
    leave_idle_priority()
    while os.read(fd, 1):
        pass
    os.close(fd)
    return recover({WATCHDOG_ENV: "1"})


def recover(env: dict[str, str]) -> int:
    with open(protocol.RECOVERY_LOCK_IN_RAMFS, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return _recover_locked(env)


def _recover_locked(env: dict[str, str]) -> int:
    left = read_leftovers()
    if not left.anything():
        _clean_state()
        return 0
    ignore_stop_signals()
    harden()
    record = CycleRecord([p.name for p in left.plan])
    record.step("recovery_start")
    record.fail(death_reason(env))
    record.suspended = list(left.suspended)
    record.hardening = hardening_status()
    if left.saved_rcu is not None:
        try:
            power.set_rcu_expedited(left.saved_rcu)
            record.step("rcu_restored")
        except OSError as e:
            record.problems.append(f"rcu_expedited left at 1: {e}")
    h = _helper_for(left, record)
    ops = RecoveryOps(h, record)
    plan = [p for p in left.plan if p.name in left.suspended]
    wind_down(
        ops,
        plan,
        left.suspended,
        left.frozen,
        left.saved_sync,
        record,
        h.poweroff_after,
        sleep_again=h.sleeps,
    )
    # A helper that died at the prompt left the kernel's messages off the consoles.
    vt.restore_console_loglevel()
    # Thawed: the journal may be written to again, and the desktop have its VT back.
    if h._terminal is not None:
        with contextlib.suppress(Exception):
            h.terminal.switch_back()
    rec = record.as_dict()
    log(WARNING, f"{rec['reason']}: recovery record: " + json.dumps(rec, sort_keys=True))
    left_suspended = essential_suspended(left.plan, left.suspended, record.resumed)
    log(INFO if not left_suspended else WARNING, "recovery done")
    return 0
