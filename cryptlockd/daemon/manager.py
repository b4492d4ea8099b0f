"""The daemon's state: the config, the LUKS devices, the self-checks behind Protected and
Problems, and the end of every sleep (back_to_idle). What happens between PrepareForSleep
and that end is sleep_cycle.py's. No D-Bus here beyond logind and one systemd property:
service.py shows this state on the bus and calls in for the methods.

Every change of state goes through `with self.changing():`, which re-evaluates the checks
and announces the properties that changed, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from dbus_fast.aio import MessageBus

from cryptlockd.daemon import checks, coverage, key_risks, sleep_report, tokens
from cryptlockd.daemon.armer import Armer, CycleRecord
from cryptlockd.daemon.config import Config, load_config
from cryptlockd.daemon.devices import LuksDevice, SystemPaths, apply_exclude, discover_devices
from cryptlockd.daemon.log import MessageId, event
from cryptlockd.daemon.logind import Logind
from cryptlockd.daemon.notify import Notifier
from cryptlockd.daemon.service_watchdogs import ServiceWatchdogs
from cryptlockd.daemon.sleep_cycle import SLEEP_DEADLINE, SleepCycle
from cryptlockd.daemon.sleep_report import SleepRequest
from cryptlockd.daemon.systemd_unit import SystemdUnit
from cryptlockd.defs import DBUS_CALL_TIMEOUT, SLEEP_SERVICE, State
from cryptlockd.errors import Busy, ConfigError, NotProtected, RemoteError
from cryptlockd.helper import protocol

__all__ = ["Listener", "Manager"]

log = logging.getLogger("cryptlockd")


class Listener(Protocol):
    """Who shows the manager's state (service.py)."""

    def snapshot(self) -> dict[str, Any]:
        """The values of the properties that announce their changes."""

    def properties_changed(self, names: list[str]) -> None: ...

    def cycle_finished(self, success: bool, record: CycleRecord) -> None: ...


class _Nobody:
    def snapshot(self) -> dict[str, Any]:
        return {}

    def properties_changed(self, names: list[str]) -> None:
        pass

    def cycle_finished(self, success: bool, record: CycleRecord) -> None:
        pass


class Manager:
    def __init__(
        self,
        bus: MessageBus,
        armer: Armer,
        notifier: Notifier,
        *,
        root: Path,
        paths: SystemPaths,
        cgroup_root: Path,
        sleep_deadline: float = SLEEP_DEADLINE,
    ) -> None:
        self.root = root
        self.paths = paths
        self.cgroup_root = cgroup_root
        self.armer = armer
        self.notifier = notifier
        self.listener: Listener = _Nobody()

        self.config = Config()
        self.config_error: str | None = None
        self.enabled = True
        self.state = State.IDLE
        self.devices: list[LuksDevice] = []
        self.excluded: list[str] = []
        self.protected = False
        self.problems: list[str] = []
        self.last_cycle: CycleRecord = {}
        # PrepareForSleep and the ends of a sleep; back_to_idle() is here.
        self.cycle = SleepCycle(self, sleep_deadline)
        self.tokens = tokens.TokenWatch(self.refresh)
        # The sleep entry's trace of a stock sleep (under --root, like the unit files).
        self.stock_trace = root / protocol.STOCK_SLEEP_TRACE.lstrip("/")
        # systemd-suspend.service's effective ExecStart= (None: systemd not asked).
        self._sleep_unit = SystemdUnit(bus, SLEEP_SERVICE)
        self.sleep_exec: list[list[str]] | None = None
        self._watching_reloads = False
        self.check_results: list[checks.CheckResult] = []
        # Set when READY=1 went out before the armer was ready (the wait is bounded).
        self.not_ready: str | None = None
        self._ready_task: asyncio.Task[None] | None = None

        self.logind = Logind(
            bus,
            on_prepare_for_sleep=self.prepare_for_sleep,
            on_change=self.refresh,
            on_owner_change=self.cycle.logind_restarted,
            timeout=DBUS_CALL_TIMEOUT,
        )
        armer.watch(self.refresh, self.cycle_finished)
        self.service_watchdogs = ServiceWatchdogs.on_bus(bus, root)
        self._started = False
        self._retaking_inhibitor = False
        self._changing = 0
        self._check_after = False
        self._status_sent = ""

    # --- changes ---------------------------------------------------------------------

    @contextlib.contextmanager
    def changing(self, evaluate: bool = True) -> Iterator[None]:
        """Around every change of state: afterwards (even when the change raised), the
        checks run again (unless no level asked for them) and the properties that changed
        are announced, once. Nested uses announce with the outermost."""
        before = self.listener.snapshot() if self._changing == 0 else {}
        self._changing += 1
        self._check_after = self._check_after or evaluate
        try:
            yield
        finally:
            self._changing -= 1
            if self._changing == 0:
                if self._check_after:
                    self._evaluate()
                self._check_after = False
                self._send_status()
                after = self.listener.snapshot()
                changed = [n for n in after if after[n] != before.get(n)]
                if changed and self._started:
                    self.listener.properties_changed(changed)

    def refresh(self) -> None:
        """Re-evaluate after anything changed (inhibitor, devices, config, enabled)."""
        with self.changing():
            pass

    def set_state(self, state: State, *, evaluate: bool = True) -> None:
        """evaluate=False, for the sleep's own steps: nothing the checks read changes
        while a sleep is being armed, and under a slow CPU the checks cost logind tenths
        of a second on the way to the sleep (issue 12); the cycle's end evaluates."""
        with self.changing(evaluate):
            self.state = state

    # --- evaluation ------------------------------------------------------------------

    @property
    def arm_timeout(self) -> float:
        return self.config.cycle.arm_timeout_sec

    def run_checks(self) -> list[checks.CheckResult]:
        sleeping = self.sleep is not None or self._retaking_inhibitor
        return [
            checks.check_enabled(self.enabled),
            checks.check_cgroup2(self.cgroup_root),
            checks.check_sync_on_suspend(self.paths.sysfs),
            checks.check_suspend_to_ram(self.paths.sysfs),
            checks.check_logind(self.logind.owner, self.logind.inhibitor_held, sleeping),
            checks.check_inhibit_delay(self.logind.delay_max_usec, self.arm_timeout),
            checks.check_devices(self.devices, self.excluded),
            coverage.check_coverage_of(self.paths.sysfs, self.devices, self.excluded),
            checks.check_sleep_dropin(self.root, self.sleep_exec),
            *self.armer.status(),
            checks.check_config(self.config_error),
            *checks.check_ready(self.not_ready),
            *key_risks.check_key_risks(key_risks.crypto_facts(self.paths.crypttab)),
            *self.tokens.check(self.devices, read=not sleeping),
            *checks.check_last_cycle(self.last_cycle),
        ]

    def _evaluate(self) -> None:
        try:
            self.check_results = self.run_checks()
        except Exception as e:
            # A broken check must not take the daemon down; it just cannot vouch for us.
            log.exception("a self-check failed")
            self.check_results = [checks.CheckResult("self-checks", False, f"a check failed: {e}")]
        protected, problems = checks.evaluate(self.check_results)
        if protected != self.protected or problems != self.problems:
            log.info(
                "protection: %s%s",
                "yes" if protected else "no",
                "".join(f"\n  {p}" for p in problems),
                extra=event(MessageId.PROTECTION_CHANGED, PROTECTED=int(protected)),
            )
        self.protected, self.problems = protected, problems

    def _send_status(self) -> None:
        status = self.status_line()
        if self._started and status != self._status_sent:
            self._status_sent = status
            self.notifier.status(status)

    def status_line(self) -> str:
        if self.protected:
            return f"Protected; {len(self.devices)} LUKS device(s); {self.state.value}"
        return f"Not protected: {self.problems[0] if self.problems else 'unknown'}"

    # --- config and devices ----------------------------------------------------------

    def load_devices(self) -> None:
        with self.changing():
            try:
                found = discover_devices(self.paths)
            except Exception:
                # Runs from the hotplug callback too: odd sysfs content must not kill us.
                log.exception("device discovery failed")
                found = []
            kept = apply_exclude(found, self.config.devices.exclude)
            self.excluded = [d.name for d in found if d not in kept]
            if kept != self.devices:
                log.info(
                    "LUKS devices: %s",
                    ", ".join(d.name for d in kept) or "(none)",
                    extra=event(MessageId.DEVICES_CHANGED, DEVICES=" ".join(d.name for d in kept)),
                )
            self.devices = kept

    def load_config(self) -> None:
        """Raises ConfigError and keeps the last good config when the files are bad."""
        try:
            config = load_config(self.root)
        except ConfigError as e:
            self.config_error = str(e)
            log.error("configuration invalid: %s", e, extra=event(MessageId.CONFIG_INVALID))
            raise
        self.config, self.config_error = config, None
        self.enabled = config.enabled
        self.armer.configure(config)
        log.info(
            "configuration loaded (enabled=%s)",
            config.enabled,
            extra=event(MessageId.CONFIG_LOADED),
        )

    def reload(self) -> None:
        """Reload(): a failed reload still shows up in Check and Problems, and raises."""
        self.logind.serially(self.read_sleep_exec())
        with self.changing():
            self.load_config()
        self.load_devices()

    def set_enabled(self, enabled: bool, by: str | None) -> None:
        with self.changing():
            self.enabled = enabled
            log.info("protection %s by %s", "enabled" if enabled else "disabled", by)

    @property
    def sleep(self) -> SleepRequest | None:
        """The sleep under way, from PrepareForSleep(true) until back_to_idle()."""
        return self.cycle.sleep

    def device_names(self) -> list[str]:
        return [d.name for d in self.devices]

    def device(self, name: str) -> LuksDevice | None:
        return next((d for d in self.devices if d.name == name), None)

    # --- the sleep cycle -------------------------------------------------------------

    def may_sleep(self, sender: str | None) -> None:
        if self.sleep is not None:
            raise Busy(f"a sleep is already in progress ({self.state.value})")
        if not self.protected:
            # The caller asked for a sleep with the keys wiped; one that keeps them is
            # theirs to ask logind for (systemctl suspend), not ours to give silently.
            log.warning("suspend requested by %s refused: not protected", sender)
            raise NotProtected(
                "the next sleep would not wipe the keys: "
                + "; ".join(self.problems or ["unknown reason"])
            )

    async def prepare_for_sleep(self, start: bool) -> None:
        await self.cycle.prepare_for_sleep(start)

    def cycle_finished(self, success: bool, record: CycleRecord) -> None:
        """The helper's record (or the recovery's, for a helper that died)."""
        self.back_to_idle(success, record)

    def back_to_idle(self, success: bool, record: CycleRecord) -> None:
        """THE way back to idle: every sleep ends here, once, with its record (the helper's,
        or an unprotected one), whatever ended it. Whatever a sleep changed and must be put
        back is put back here."""
        self.cycle.over()
        # The sleep's inhibitor is taken again just below, asynchronously; until then the
        # logind check must not flap Protected to false (and every desktop warn) for the
        # milliseconds that takes.
        retake = self.logind.owner is not None and not self.logind.inhibitor_held
        self._retaking_inhibitor = retake
        with self.changing():
            self.state = State.IDLE
            self.last_cycle = dict(record)
            self.last_cycle.setdefault("success", success)
            log.log(
                logging.INFO if success else logging.WARNING,
                "cycle finished: %s",
                record.get("result") or ("success" if success else "FAILED"),
                extra=event(MessageId.CYCLE_FINISHED, SUCCESS=int(success)),
            )
        self.listener.cycle_finished(success, record)
        self.notifier.restore_watchdog()
        self.logind.serially(self.service_watchdogs.restore())
        if retake:
            self.logind.serially(self._retake_inhibitor())
        if self._started:
            # A drop-in added (and systemd reloaded) since shows at the next sleep's end.
            self.logind.serially(self.read_sleep_exec())

    async def _retake_inhibitor(self) -> None:
        try:
            await self.logind.ensure_inhibitor()
        finally:
            self._retaking_inhibitor = False
            self.refresh()

    # --- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self.load_config()
        except ConfigError:
            # The defaults stand in; the armer still prepares for the first sleep.
            self.armer.configure(self.config)
        self.load_devices()
        await self.service_watchdogs.restore()  # a daemon that died mid-cycle left them off
        await self.logind.start()
        self._started = True
        await self.read_sleep_exec()
        trace = sleep_report.take_stock_trace(str(self.stock_trace))
        if trace is not None:
            log.warning("a sleep ran unprotected while we were not running: %s", trace["reason"])
            self.back_to_idle(False, sleep_report.trace_record(trace, self.device_names()))
        self.logind.serially(self.cycle.join_sleep())

    async def read_sleep_exec(self) -> None:
        try:
            exec_start = await self._sleep_unit.exec_start()
        except RemoteError as e:
            log.debug("cannot read the effective ExecStart= of %s: %s", SLEEP_SERVICE, e)
            exec_start = None
        if exec_start is not None and not self._watching_reloads:
            # A drop-in takes effect at systemd's next daemon-reload: read it again then.
            self._watching_reloads = True
            with contextlib.suppress(RemoteError):
                await self._sleep_unit.on_reload(
                    lambda: self.logind.serially(self.read_sleep_exec())
                )
        with self.changing():
            self.sleep_exec = exec_start

    async def wait_ready(self, timeout: float) -> bool:
        """Before READY=1: wait until the next sleep would be protected (the armer's RAM
        filesystem and idle helper), `timeout` seconds at most. False when the wait ran
        out; Problems then says so until the armer is ready."""
        task = asyncio.get_running_loop().create_task(self.armer.ready())
        done, _ = await asyncio.wait({task}, timeout=timeout)
        if task in done:
            return True
        self._ready_task = task
        with self.changing():
            self.not_ready = f"the sleep-cycle helper was not ready {timeout:g} s after start"
        log.warning(
            "ready although the next sleep may not be protected: %s", "; ".join(self.problems)
        )
        task.add_done_callback(self._armer_ready)
        return False

    def _armer_ready(self, task: asyncio.Task[None]) -> None:
        self._ready_task = None
        if task.cancelled():
            return
        with self.changing():
            self.not_ready = None
        log.info("the sleep-cycle helper is ready now")

    def ready_status(self) -> str:
        """The status line for READY=1; later changes go out as STATUS= on their own."""
        self._status_sent = self.status_line()
        return self._status_sent

    def stop(self) -> None:
        self.cycle.over()
        self.logind.stop()
