"""The helper's state from arm to report, and what each message makes it do.

`arm`: lock itself in memory, open the devices and its VT, reserve the KDF memory.
`begin`: start the switch to the VT. `sleep`: run the cycle (cycle.run_cycle with SystemOps).
`finish`: switch the VT back and close the record, which goes to the journal (stderr) and to
the daemon. Who may send which message, and when, is server.py's business.
"""

from __future__ import annotations

import json
import os
import time

from cryptlockd.helper import mappings, power, protocol
from cryptlockd.helper.cycle import DevicePlan, run_cycle
from cryptlockd.helper.hardening import harden, hardening_status
from cryptlockd.helper.journal import INFO, WARNING, log
from cryptlockd.helper.kdf import KdfBudget, kdf_memory_at_once
from cryptlockd.helper.libcryptsetup import Device, Library, UnsupportedDevice
from cryptlockd.helper.record import CycleRecord
from cryptlockd.helper.reserve import Reserve, reserve_kib
from cryptlockd.helper.system_ops import SystemOps, freeze_plan, read_fault_hook
from cryptlockd.helper.vt import Terminal

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from cryptlockd.helper.protocol import (
        ArmedMessage,
        ArmMessage,
        DoneMessage,
        FinishMessage,
        ReadyMessage,
        ResumedMessage,
        SleepMessage,
        WatchdogsOffMessage,
    )


class Helper:
    def __init__(self) -> None:
        self.library: Library | None = None
        self.devices: dict[str, Device] = {}
        # Loaded while idle (preload), by dm name, with the dm UUID they were loaded under.
        self.preloaded: dict[str, tuple[str, Device]] = {}
        self.plan: list[DevicePlan] = []
        # The LUKS mappings there when armed: any other found at the suspend was opened
        # after arming (SystemOps.late_devices).
        self.armed_mappings: set[str] = set()
        self._terminal: Terminal | None = None
        # begin() asked for the switch to our VT, and nobody has waited for it yet.
        self.vt_switching = False
        # The daemon's `watchdogs_off` is still to come (ArmMessage.watchdogs_pending).
        self.watchdogs_pending = False
        self.reserve = Reserve(0)
        # What the KDFs may hold at once after the wake: the reserve, once handed back.
        self.kdf_budget = KdfBudget(0)
        self.reserve_wanted = 0
        self.reserve_error = ""
        self.sleep_state = "mem"
        self.mem_sleep: str | None = None
        self.freeze_timeout = protocol.DEFAULT_FREEZE_TIMEOUT
        self.sync_timeout = protocol.DEFAULT_SYNC_TIMEOUT
        self.syncfs_timeout = protocol.DEFAULT_SYNCFS_TIMEOUT
        # Forked after `armed` (server.py), for the cycle's sync() and syncfs().
        self.sync_worker = power.SyncWorker()
        self.backoff_initial = protocol.DEFAULT_BACKOFF_INITIAL
        self.backoff_max = protocol.DEFAULT_BACKOFF_MAX
        self.poweroff_after = protocol.DEFAULT_POWEROFF_AFTER
        # False for Lock(): no sleep write (prompt's Esc has no sleep to go back to).
        self.sleeps = True
        self.drop_page_cache = False
        self.poweroff_locked_after = protocol.DEFAULT_POWEROFF_LOCKED_AFTER
        self.unanswered_wake_after = protocol.DEFAULT_UNANSWERED_WAKE_AFTER
        self.record = CycleRecord([])
        self.daemon: protocol.Channel | None = None
        # The test hook's step (system_ops.read_fault_hook), or "".
        self.fault = ""
        self.watchdog = 0  # its pid, once forked (server.py, recover.start_watchdog)

    def preload(self) -> None:
        """Opens every LUKS mapping while idle: reading headers at arm time queues behind
        a busy writer's I/O, and logind waits for the arm. Each header is read again
        after the sleep (SystemOps.refresh_header), just before its device's resume."""
        assert self.library is not None
        for name, uuid in mappings.luks_mappings().items():
            try:
                self.preloaded[name] = (uuid, Device(self.library, name))
            except UnsupportedDevice:
                pass  # a detached header: opened with it when armed
            except Exception as e:
                log(WARNING, f"preloading {name}: {e} (it is opened when armed instead)")

    def _take_devices(self, plan: list[DevicePlan], current: dict[str, str]) -> dict[str, Device]:
        """The plan's devices: preloaded ones if the mapping is still the same (by dm UUID,
        from sysfs), freshly opened otherwise (with its detached header, on the real
        root). Raises if one cannot be opened; a device whose context has no LUKS type is
        left out of the plan, unprotected, and the record says so. `current`: the
        mappings as the arm just read them (mappings.luks_mappings)."""
        assert self.library is not None
        for stale in self.devices.values():  # from an earlier arm: never reused
            stale.free()
        old, self.preloaded, self.devices = self.preloaded, {}, {}
        taken: dict[str, Device] = {}
        try:
            for p in list(plan):
                name = p.name
                uuid, dev = old.pop(name, ("", None))
                if dev is not None and uuid and uuid == current.get(name) and not p.header:
                    taken[name] = dev
                    continue
                if dev is not None:
                    dev.free()
                header = power.HOST_ROOT + p.header if p.header else ""
                try:
                    taken[name] = Device(self.library, name, header)
                except UnsupportedDevice as e:
                    plan.remove(p)
                    self.unprotected(name, str(e))
        except BaseException:
            for dev in taken.values():
                dev.free()
            raise
        finally:
            for _, dev in old.values():
                dev.free()
        return taken

    def unprotected(self, name: str, why: str, journal: bool = True) -> None:
        # Never suspended: its key stays in RAM through this sleep. The cycle cannot succeed.
        problem = f"{why}: NOT suspended, its key stays in RAM through this sleep"
        if journal:  # not while the system is frozen: the record carries it then
            log(WARNING, problem)
        self.record.problems.append(problem)
        self.record.verification[name] = {"dm_table_key": "not suspended", "protected": "no"}

    @property
    def terminal(self) -> Terminal:
        if self._terminal is None:
            raise RuntimeError("not armed: no VT")
        return self._terminal

    # -- arming -------------------------------------------------------------------------

    def arm(self, msg: ArmMessage) -> ArmedMessage:
        self.record = CycleRecord([d["name"] for d in msg["devices"]])
        self.record.step("helper_arm")
        harden()
        self.record.step("helper_hardened")

        # Fail now, while the sleep can still go ahead unprotected and say so, rather
        # than mid-cycle.
        freeze_plan()
        if self.library is None:
            self.library = Library()
        self.plan = [DevicePlan.from_dict(dict(d)) for d in msg["devices"]]
        current = mappings.luks_mappings()
        self.armed_mappings = set(current)
        self.devices = self._take_devices(self.plan, current)
        hints = msg["keyslots"] or {}
        for p in self.plan:
            if isinstance(hints.get(p.name), int):
                self.devices[p.name].last_keyslot = hints[p.name]
        self.record.step("helper_devices_loaded")
        self.sleep_state = str(msg["sleep_state"])
        self.mem_sleep = msg["mem_sleep"] or None
        self.record.sleep_state = self.sleep_state
        self.freeze_timeout = float(msg["freeze_timeout"])
        # Absent from an older daemon's arm message: the defaults.
        self.sync_timeout = float(msg.get("sync_timeout", protocol.DEFAULT_SYNC_TIMEOUT))
        self.syncfs_timeout = float(msg.get("syncfs_timeout", protocol.DEFAULT_SYNCFS_TIMEOUT))
        self.backoff_initial = float(msg["backoff_initial"])
        self.backoff_max = float(msg["backoff_max"])
        self.poweroff_after = int(msg["poweroff_after"])
        self.sleeps = bool(msg.get("sleeps", True))
        self.drop_page_cache = bool(msg.get("drop_page_cache", False))
        self.watchdogs_pending = bool(msg.get("watchdogs_pending", False))
        if not self.sleeps:
            self.record.action = "lock"
        self.poweroff_locked_after = float(
            msg.get("poweroff_locked_after", protocol.DEFAULT_POWEROFF_LOCKED_AFTER)
        )
        self.unanswered_wake_after = float(
            msg.get("unanswered_wake_after", protocol.DEFAULT_UNANSWERED_WAKE_AFTER)
        )
        memory = {name: dev.pbkdf_memory_kib() for name, dev in self.devices.items()}
        asking = [p.name for p in self.plan if p.keyfile is None]
        kib = reserve_kib(kdf_memory_at_once(memory, asking))
        self.reserve_wanted = kib
        if self._terminal is None:
            self._terminal = Terminal(int(msg["vt"]))
        self.fault = read_fault_hook()
        if self.fault:
            log(WARNING, f"test hook {protocol.FAULT_HOOK}: this cycle fails at {self.fault}")
        self.record.step("helper_armed")
        return {
            "op": protocol.OP_ARMED,
            "vt": self.terminal.number,
            "reserve_kib": kib,
            "pid": os.getpid(),
        }

    def take_reserve(self) -> None:
        """The KDF reserve, taken right after `armed` (logind waits for that, not for this)
        and faulted in by a thread of low priority while logind starts the sleep entry
        (reserve.py); the cycle waits for it before the first suspend. Should it not be
        mapped, `begin` is refused (reserve_error) and the sleep entry falls back to the
        stock sleep. The cycle's children (the watchdog, the sync worker) are forked
        before: a child forked while the thread runs is a copy taken mid-call."""
        self.reserve_error = ""
        kib = self.reserve_wanted
        if kib != self.reserve.kib:
            self.reserve.release()
            try:
                self.reserve = Reserve(kib)
            except (OSError, MemoryError, ValueError) as e:
                self.reserve = Reserve(0)
                self.reserve_error = f"cannot hold {kib} KiB for the KDF: {e or type(e).__name__}"
                log(WARNING, self.reserve_error)
        self.reserve.start_filling()
        self.record.hardening = hardening_status()  # again once it is in (reserve_ready)

    def reserve_ready(self) -> None:
        """Before the first suspend: the reserve all in RAM. Raises when it could not be
        faulted in whole (the KDF may then lack memory at resume; the cycle notes it)."""
        error = self.reserve.ready(protocol.RESERVE_WAIT)
        # Dated by its thread, noted here: only this thread writes the record.
        if self.reserve.filled_at is not None:
            self.record.step("helper_kdf_reserved", at=self.reserve.filled_at)
        self.record.hardening = hardening_status()
        if error:
            raise OSError(error)

    def start_sync_worker(self) -> None:
        """After `armed`, before the reserve's thread starts: the child that runs this
        cycle's sync() and syncfs() (power.SyncWorker). Without it, each forks its own, as
        before."""
        try:
            self.sync_worker.start()
        except OSError as e:
            log(WARNING, f"no worker for sync() and syncfs(), each forks its own: {e}")

    # -- the cycle ------------------------------------------------------------------------

    def begin(self) -> ReadyMessage:
        """Starts the switch to our VT and answers at once: the display server lets go of
        its VT while the sleep entry runs its hooks and we sync (issue 12); the cycle
        waits for the switch before it freezes anything (SystemOps.wait_vt)."""
        self.record.step("begin")
        self.reserve.hurry()
        self.vt_switching = False
        # Written first: a write to a VT blocks while the console switches.
        then = " and going to sleep" if self.sleeps else ""
        self.terminal.write(f"\033[H\033[2Jcryptlockd: locking the disks{then}.\n")
        try:
            self.terminal.start_activate(self.terminal.number)
            self.vt_switching = True
        except Exception as e:
            self.record.problems.append(f"VT switch: {e}")
        return {"op": protocol.OP_READY}

    def wait_vt(self) -> None:
        """The end of the switch begin() started (nothing when it could not start)."""
        if self.vt_switching:
            self.vt_switching = False
            self.terminal.wait_active(self.terminal.number)

    def watchdogs_off(self, msg: WatchdogsOffMessage) -> None:
        """The daemon's word that PID 1's service watchdogs are off. With it may come the
        sleep state read for this sleep: the arm went out with the one read for the last
        (daemon/helper_armer.py), and this word comes before anything is frozen."""
        self.watchdogs_pending = False
        if "sleep_state" in msg:
            self.sleep_state = str(msg["sleep_state"])
            self.mem_sleep = msg.get("mem_sleep") or None
            self.record.sleep_state = self.sleep_state
            log(INFO, f"sleep state changed since the last sleep: {self.sleep_state}")

    def wait_watchdogs(self) -> None:
        """Until the daemon says PID 1's service watchdogs are off (it let logind go on
        before that, issue 12): a frozen service must not be killed by PID 1 during a
        long prompt (SPEC 2.4). Raises TimeoutError after WATCHDOGS_WAIT, when the daemon
        never says it; a daemon that went away cannot say it any more."""
        deadline = time.monotonic() + protocol.WATCHDOGS_WAIT
        while self.watchdogs_pending and self.daemon is not None:
            try:
                msg = self.daemon.receive(max(0.0, deadline - time.monotonic()))
            except protocol.ProtocolError as e:
                raise RuntimeError(f"a bad message from the daemon: {e}") from e
            if msg is None:
                if self.daemon.ended:
                    self.daemon = None  # it went away
                    break
                self.watchdogs_pending = False  # one wait per cycle
                raise TimeoutError(
                    f"the daemon did not say within {protocol.WATCHDOGS_WAIT:g} s that "
                    "PID 1's service watchdogs are off"
                )
            elif msg["op"] == protocol.OP_WATCHDOGS_OFF:
                self.watchdogs_off(msg)
            # Anything else (a late `disarm`) has no say mid-cycle.
        self.watchdogs_pending = False

    def _entry_steps(self, times: dict[str, float]) -> None:
        # The sleep entry's own steps (hooks), on the same clock, into our timeline.
        for name, t in (times or {}).items():
            self.record.step(str(name), float(t))

    def sleep(self, msg: SleepMessage) -> ResumedMessage:
        self._entry_steps(msg["times"])
        run_cycle(
            SystemOps(self),
            self.plan,
            self.record,
            self.poweroff_after,
            sleeps=self.sleeps,
            drop_page_cache=self.drop_page_cache,
        )
        return {
            "op": protocol.OP_RESUMED,
            "slept": self.record.slept,
            "reason": self.record.reason,
        }

    def finish(self, msg: FinishMessage | None) -> DoneMessage:
        """msg: None when the sleep entry went away without one."""
        if msg is not None:
            self._entry_steps(msg["times"])
        try:
            self.terminal.switch_back()
            self.record.step("vt_switched_back")
        except Exception as e:
            self.record.problems.append(f"VT switch back: {e}")
        self.record.keyslots = {
            name: dev.last_keyslot for name, dev in self.devices.items() if dev.last_keyslot >= 0
        }
        self.record.keyslots_tried = {
            name: list(dev.tried) for name, dev in self.devices.items() if dev.tried
        }
        self.record.finish()
        return {"op": protocol.OP_DONE, "success": self.record.success}

    def report(self) -> None:
        rec = self.record.as_dict()
        log(INFO if rec["success"] else WARNING, "cycle record: " + json.dumps(rec, sort_keys=True))
        for line in (self.library.messages if self.library else [])[-10:]:
            log(INFO, f"libcryptsetup: {line}")
        if self.daemon is not None:
            try:
                self.daemon.send(
                    {"op": protocol.OP_RECORD, "success": rec["success"], "record": rec}
                )
            except OSError as e:
                log(WARNING, f"could not hand the cycle record to the daemon: {e}")
