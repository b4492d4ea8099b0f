"""The daemon's state and the sleep cycle: the config, the LUKS devices, the self-checks
behind Protected and Problems, and what happens on PrepareForSleep. No D-Bus here beyond
logind: service.py shows this state on the bus and calls in for the methods.

Every change of state goes through `with self.changing():`, which re-evaluates the checks
and announces the properties that changed, once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

from dbus_fast.aio import MessageBus

from cryptlockd.daemon import checks, coverage
from cryptlockd.daemon.armer import Armer, CycleRecord
from cryptlockd.daemon.config import Config, load_config
from cryptlockd.daemon.devices import LuksDevice, SystemPaths, apply_exclude, discover_devices
from cryptlockd.daemon.log import MessageId, event
from cryptlockd.daemon.logind import Logind
from cryptlockd.daemon.notify import Notifier
from cryptlockd.defs import DBUS_CALL_TIMEOUT, State
from cryptlockd.errors import Busy, ConfigError, NotProtected

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
        self.cycle_came = False
        self.check_results: list[checks.CheckResult] = []
        # Set when READY=1 went out before the armer was ready (the wait is bounded).
        self.not_ready: str | None = None
        self._ready_task: asyncio.Task[None] | None = None

        self.logind = Logind(
            bus,
            on_prepare_for_sleep=self.prepare_for_sleep,
            on_change=self.refresh,
            timeout=DBUS_CALL_TIMEOUT,
        )
        armer.watch(self.refresh, self.cycle_finished)
        self._started = False
        self._changing = 0
        self._status_sent = ""

    # --- changes ---------------------------------------------------------------------

    @contextlib.contextmanager
    def changing(self) -> Iterator[None]:
        """Around every change of state: afterwards (even when the change raised), the
        checks run again and the properties that changed are announced, once. Nested uses
        announce with the outermost."""
        before = self.listener.snapshot() if self._changing == 0 else {}
        self._changing += 1
        try:
            yield
        finally:
            self._changing -= 1
            if self._changing == 0:
                self._evaluate()
                after = self.listener.snapshot()
                changed = [n for n in after if after[n] != before.get(n)]
                if changed and self._started:
                    self.listener.properties_changed(changed)

    def refresh(self) -> None:
        """Re-evaluate after anything changed (inhibitor, devices, config, enabled)."""
        with self.changing():
            pass

    def set_state(self, state: State) -> None:
        with self.changing():
            self.state = state

    # --- evaluation ------------------------------------------------------------------

    @property
    def arm_timeout(self) -> float:
        return self.config.cycle.arm_timeout_sec

    def run_checks(self) -> list[checks.CheckResult]:
        sleeping = self.state in (State.ARMING, State.ARMED)
        return [
            checks.check_enabled(self.enabled),
            checks.check_cgroup2(self.cgroup_root),
            checks.check_sync_on_suspend(self.paths.sysfs),
            checks.check_suspend_to_ram(self.paths.sysfs),
            checks.check_logind(self.logind.owner, self.logind.inhibitor_held, sleeping),
            checks.check_inhibit_delay(self.logind.delay_max_usec, self.arm_timeout),
            checks.check_devices(self.devices, self.excluded),
            coverage.check_coverage_of(self.paths.sysfs, self.devices, self.excluded),
            checks.check_sleep_dropin(self.root),
            *self.armer.status(),
            checks.check_config(self.config_error),
            *checks.check_ready(self.not_ready),
            # Issue 5: what this kernel and libcryptsetup risk for the keys, and whether
            # the last sleep's wipe was proven.
            *checks.check_key_risks(checks.crypto_facts(self.paths.crypttab)),
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
        with self.changing():
            self.load_config()
        self.load_devices()

    def set_enabled(self, enabled: bool, by: str | None) -> None:
        with self.changing():
            self.enabled = enabled
            log.info("protection %s by %s", "enabled" if enabled else "disabled", by)

    def device(self, name: str) -> LuksDevice | None:
        return next((d for d in self.devices if d.name == name), None)

    # --- the sleep cycle -------------------------------------------------------------

    async def suspend(self, sender: str | None) -> None:
        """Suspend(), once polkit has said yes."""
        if self.state != State.IDLE:
            raise Busy(f"a sleep is already in progress ({self.state.value})")
        if not self.protected:
            # The caller asked for a sleep with the keys wiped; one that keeps them is
            # theirs to ask logind for (systemctl suspend), not ours to give silently.
            log.warning("suspend requested by %s refused: not protected", sender)
            raise NotProtected(
                "the next sleep would not wipe the keys: "
                + "; ".join(self.problems or ["unknown reason"])
            )
        log.info(
            "suspend requested by %s",
            sender,
            extra=event(MessageId.SUSPEND_REQUESTED, SENDER=sender or ""),
        )
        await self.logind.suspend()

    async def prepare_for_sleep(self, start: bool) -> None:
        log.info(
            "PrepareForSleep(%s)",
            "true" if start else "false",
            extra=event(MessageId.PREPARE_FOR_SLEEP, START=int(start)),
        )
        if start:
            self.notifier.suspend_watchdog()
            await self._arm()
        else:
            await self._resumed()
            self.notifier.restore_watchdog()

    async def _arm(self) -> None:
        if self.state != State.IDLE:
            log.warning("PrepareForSleep(true) while %s; ignored", self.state.value)
            return
        t0 = time.monotonic()
        self.cycle_came = False
        if not self.enabled or not self.devices:
            why = "protection disabled" if not self.enabled else "no LUKS device"
            log.warning(
                "this sleep is NOT protected, the LUKS keys stay in RAM: %s",
                why,
                extra=event(MessageId.UNPROTECTED_SLEEP, REASON=why),
            )
            self.logind.release_inhibitor("sleeping unprotected")
            return
        if not self.protected:
            # Arm anyway: the armer may still manage (or records, under test); whatever
            # fails is logged there, and the sleep entry falls back to a plain sleep.
            log.warning("arming although checks fail: %s", "; ".join(self.problems))
        self.set_state(State.ARMING)
        timeout = self.arm_timeout
        try:
            await asyncio.wait_for(self.armer.arm(list(self.devices), self.cycle_finished), timeout)
        except Exception as e:
            why = f"arming timed out after {timeout} s" if isinstance(e, TimeoutError) else str(e)
            log.critical(
                "this sleep is NOT protected, the LUKS keys stay in RAM: cannot arm the helper: %s",
                why,
                extra=event(MessageId.UNPROTECTED_SLEEP, REASON=why),
            )
            self.logind.release_inhibitor("arming failed")
            self.set_state(State.IDLE)
            return
        self.set_state(State.ARMED)
        self.logind.release_inhibitor("armed")
        seconds = time.monotonic() - t0
        log.info(
            "armed in %.3f s", seconds, extra=event(MessageId.ARMED, ARM_SECONDS=f"{seconds:.3f}")
        )

    async def _resumed(self) -> None:
        was = self.state
        await self.logind.take_inhibitor()
        if was in (State.ARMED, State.ARMING) and not self.cycle_came:
            # Hibernate and friends, or an aborted sleep: the helper never ran.
            try:
                await asyncio.wait_for(self.armer.disarm(), DBUS_CALL_TIMEOUT)
            except Exception as e:
                log.error("disarming the helper failed: %s", e)
        log.info("resumed", extra=event(MessageId.RESUMED))
        self.set_state(State.IDLE)

    def cycle_finished(self, success: bool, record: CycleRecord) -> None:
        self.cycle_came = True
        with self.changing():
            self.last_cycle = dict(record)
            self.last_cycle.setdefault("success", success)
            log.log(
                logging.INFO if success else logging.WARNING,
                "cycle finished: %s",
                "success" if success else "FAILED",
                extra=event(MessageId.CYCLE_FINISHED, SUCCESS=int(success)),
            )
        self.listener.cycle_finished(success, record)

    # --- life cycle ------------------------------------------------------------------

    async def start(self) -> None:
        try:
            self.load_config()
        except ConfigError:
            # The defaults stand in; the armer still prepares for the first sleep.
            self.armer.configure(self.config)
        self.load_devices()
        await self.logind.start()
        self._started = True
        self.refresh()

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
        self.logind.stop()
