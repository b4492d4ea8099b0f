"""The long-running daemon: org.cryptlockd1 on the system bus.

It owns one bus connection, exports the Manager object, holds logind's delay inhibitor
and arms the sleep-cycle helper on a genuine PrepareForSleep(true).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from dbus_fast import BusType, DBusError, Message, RequestNameReply
from dbus_fast.aio import MessageBus
from dbus_fast.constants import NameFlag

from cryptlockd import __version__
from cryptlockd.bus import ExportedObject, to_vardict
from cryptlockd.daemon import checks, polkit
from cryptlockd.daemon.armer import Armer, CycleRecord
from cryptlockd.daemon.config import Config, load_config
from cryptlockd.daemon.devices import (
    LuksDevice,
    SystemPaths,
    apply_exclude,
    discover_devices,
)
from cryptlockd.daemon.helper_armer import HelperArmer
from cryptlockd.daemon.log import MessageId, event, setup_logging
from cryptlockd.daemon.logind import Logind
from cryptlockd.daemon.notify import Notifier
from cryptlockd.defs import (
    BUS_NAME,
    DBUS_CALL_TIMEOUT,
    DEVICE_FIELDS,
    INTROSPECTION_XML,
    OBJECT_PATH,
    POLKIT_ACTION_CONFIGURE,
    POLKIT_ACTION_SUSPEND,
    State,
)
from cryptlockd.errors import Busy, ConfigError, CryptlockdError, NoSuchDevice, NotProtected

log = logging.getLogger("cryptlockd")


def device_struct(d: LuksDevice) -> list[Any]:
    """(ssssbbsas), in the order the XML documents."""
    return [list(v) if isinstance(v, tuple) else v for v in (getattr(d, f) for f in DEVICE_FIELDS)]


class Manager:
    """The daemon's state and the Manager interface's behaviour."""

    def __init__(
        self,
        bus: MessageBus,
        args: argparse.Namespace,
        armer: Armer,
        notifier: Notifier,
    ) -> None:
        self.bus = bus
        self.root = Path(args.root)
        self.paths = SystemPaths(
            sysfs=Path(args.sysfs),
            mountinfo=Path(args.mountinfo),
            crypttab=Path(args.crypttab) if args.crypttab else self.root / "etc" / "crypttab",
            dev=Path(args.dev),
        )
        self.cgroup_root = (
            Path(args.cgroup_root) if args.cgroup_root else (self.paths.sysfs / "fs" / "cgroup")
        )
        self.polkit_timeout: float = args.polkit_timeout
        self.armer = armer
        self.notifier = notifier

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

        self.logind = Logind(
            bus,
            on_prepare_for_sleep=self.prepare_for_sleep,
            on_change=self.refresh,
            timeout=DBUS_CALL_TIMEOUT,
        )
        self.obj = ExportedObject(
            bus,
            OBJECT_PATH,
            INTROSPECTION_XML.read_text(),
            self.get_property,
            {
                "Suspend": self.m_suspend,
                "SetEnabled": self.m_set_enabled,
                "Reload": self.m_reload,
                "Check": self.m_check,
                "GetDevice": self.m_get_device,
            },
        )
        armer.watch(self.refresh)
        self._started = False
        self._status_sent = ""

    # --- properties ----------------------------------------------------------------

    def get_property(self, name: str) -> Any:
        match name:
            case "Version":
                return __version__
            case "Enabled":
                return self.enabled
            case "Protected":
                return self.protected
            case "Problems":
                return list(self.problems)
            case "State":
                return self.state.value
            case "Devices":
                return [device_struct(d) for d in self.devices]
            case "LastCycle":
                return to_vardict(self.last_cycle)
        raise KeyError(name)

    def _snapshot(self) -> dict[str, Any]:
        return {
            n: self.get_property(n)
            for n in ("Enabled", "Protected", "Problems", "State", "Devices", "LastCycle")
        }

    def _emit_changes(self, before: dict[str, Any]) -> None:
        after = self._snapshot()
        changed = [n for n in after if after[n] != before[n]]
        if changed and self._started:
            self.obj.emit_properties_changed(changed)

    def set_state(self, state: State) -> None:
        before = self._snapshot()
        self.state = state
        self._evaluate()
        self._emit_changes(before)

    # --- evaluation ----------------------------------------------------------------

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
            checks.check_sleep_dropin(self.root),
            *self.armer.status(),
            checks.check_config(self.config_error),
            # Issue 5: what this kernel and libcryptsetup risk for the keys, and whether
            # the last sleep's wipe was proven.
            *checks.check_key_risks(checks.crypto_facts(self.paths.crypttab)),
            *checks.check_last_cycle(self.last_cycle),
        ]

    @property
    def arm_timeout(self) -> float:
        return self.config.cycle.arm_timeout_sec

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

    def refresh(self) -> None:
        """Re-evaluate after anything changed (inhibitor, devices, config, enabled)."""
        before = self._snapshot()
        self._evaluate()
        self._emit_changes(before)

    def status_line(self) -> str:
        if self.protected:
            return f"Protected; {len(self.devices)} LUKS device(s); {self.state.value}"
        return f"Not protected: {self.problems[0] if self.problems else 'unknown'}"

    def load_devices(self) -> None:
        before = self._snapshot()
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
        self._evaluate()
        self._emit_changes(before)

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

    # --- the sleep cycle -----------------------------------------------------------

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
        log.info(
            "armed in %.3f s",
            time.monotonic() - t0,
            extra=event(MessageId.ARMED, ARM_SECONDS=f"{time.monotonic() - t0:.3f}"),
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
        before = self._snapshot()
        self.last_cycle = dict(record)
        self.last_cycle.setdefault("success", success)
        level = logging.INFO if success else logging.WARNING
        log.log(
            level,
            "cycle finished: %s",
            "success" if success else "FAILED",
            extra=event(MessageId.CYCLE_FINISHED, SUCCESS=int(success)),
        )
        self._evaluate()
        self._emit_changes(before)
        self.obj.emit_signal("CycleFinished", [success, to_vardict(record)])

    # --- methods -------------------------------------------------------------------

    async def m_suspend(self, msg: Message, args: list[Any]) -> list[Any]:
        await polkit.require(self.bus, msg.sender, POLKIT_ACTION_SUSPEND, self.polkit_timeout)
        if self.state != State.IDLE:
            raise Busy(f"a sleep is already in progress ({self.state.value})")
        if not self.protected:
            # The caller asked for a sleep with the keys wiped; one that keeps them is
            # theirs to ask logind for (systemctl suspend), not ours to give silently.
            log.warning("suspend requested by %s refused: not protected", msg.sender)
            raise NotProtected(
                "the next sleep would not wipe the keys: "
                + "; ".join(self.problems or ["unknown reason"])
            )
        log.info(
            "suspend requested by %s",
            msg.sender,
            extra=event(MessageId.SUSPEND_REQUESTED, SENDER=msg.sender or ""),
        )
        await self.logind.suspend()
        return []

    async def m_set_enabled(self, msg: Message, args: list[Any]) -> list[Any]:
        await polkit.require(self.bus, msg.sender, POLKIT_ACTION_CONFIGURE, self.polkit_timeout)
        before = self._snapshot()
        self.enabled = bool(args[0])
        log.info("protection %s by %s", "enabled" if self.enabled else "disabled", msg.sender)
        self._evaluate()
        self._emit_changes(before)
        return []

    async def m_reload(self, msg: Message, args: list[Any]) -> list[Any]:
        await polkit.require(self.bus, msg.sender, POLKIT_ACTION_CONFIGURE, self.polkit_timeout)
        before = self._snapshot()
        try:
            self.load_config()
        finally:
            # A failed reload still shows up in Check and Problems.
            self._evaluate()
            self._emit_changes(before)
        self.load_devices()
        return []

    async def m_check(self, msg: Message, args: list[Any]) -> list[Any]:
        self.refresh()
        return [[r.as_dbus() for r in self.check_results]]

    async def m_get_device(self, msg: Message, args: list[Any]) -> list[Any]:
        name = args[0]
        for d in self.devices:
            if d.name == name:
                return [device_struct(d)]
        raise NoSuchDevice(f"no LUKS device named {name[:100]!r}")

    # --- life cycle ----------------------------------------------------------------

    async def start(self) -> None:
        with contextlib.suppress(ConfigError):
            self.load_config()
        self.obj.start()
        self.load_devices()
        await self.logind.start()
        self._started = True
        self.refresh()


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="cryptlockd", description=__doc__)
    p.add_argument("--root", default="/", help="prefix for the config and unit paths")
    p.add_argument("--sysfs", default="/sys")
    p.add_argument("--mountinfo", default="/proc/self/mountinfo")
    p.add_argument("--crypttab", default=None, help="default: <root>/etc/crypttab")
    p.add_argument("--dev", default="/dev")
    p.add_argument("--cgroup-root", default=None, help="default: <sysfs>/fs/cgroup")
    p.add_argument("--no-udev", action="store_true", help="no hotplug monitor")
    p.add_argument("--log-target", choices=("auto", "journal", "stderr"), default="auto")
    p.add_argument("--polkit-timeout", type=float, default=polkit.DEFAULT_TIMEOUT)
    p.add_argument("--debug", action="store_true")
    p.add_argument("--version", action="version", version=__version__)
    return p.parse_args(argv)


async def serve(args: argparse.Namespace, notifier: Notifier, armer: Armer | None = None) -> int:
    # dbus-fast honours DBUS_SYSTEM_BUS_ADDRESS for the system bus.
    bus = await asyncio.wait_for(
        MessageBus(bus_type=BusType.SYSTEM, negotiate_unix_fd=True).connect(), DBUS_CALL_TIMEOUT
    )
    manager = Manager(bus, args, armer or HelperArmer(bus), notifier)
    await manager.start()

    monitor = None
    if not args.no_udev:
        try:
            from cryptlockd.daemon.udev_monitor import DeviceMonitor

            monitor = DeviceMonitor(manager.load_devices)
            monitor.start(asyncio.get_running_loop())
        except Exception as e:
            log.error("no hotplug monitor (devices are read at start and Reload): %s", e)
            monitor = None

    try:
        reply = await asyncio.wait_for(
            bus.request_name(BUS_NAME, NameFlag.DO_NOT_QUEUE), DBUS_CALL_TIMEOUT
        )
    except (DBusError, TimeoutError) as e:
        # AccessDenied: the bus policy lets only root own the name.
        log.error("cannot own %s: %s", BUS_NAME, e)
        return 1
    if reply not in (RequestNameReply.PRIMARY_OWNER, RequestNameReply.ALREADY_OWNER):
        log.error("cannot own %s (%s): another instance runs?", BUS_NAME, reply.name)
        return 1

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    disconnected = loop.create_task(_wait_for_disconnect(bus))
    disconnected.add_done_callback(lambda _t: stop.set())

    armer_name = type(manager.armer).__name__
    log.info(
        "cryptlockd %s running (armer: %s)",
        __version__,
        armer_name,
        extra=event(MessageId.STARTED, ARMER=armer_name),
    )
    manager._status_sent = manager.status_line()
    notifier.ready(manager._status_sent)
    notifier.start_watchdog()
    await stop.wait()

    log.info("stopping", extra=event(MessageId.STOPPING))
    notifier.stopping()
    notifier.stop_watchdog()
    if monitor is not None:
        monitor.stop()
    manager.obj.stop()
    manager.logind.stop()
    if not disconnected.done():
        with contextlib.suppress(Exception):
            await asyncio.wait_for(bus.release_name(BUS_NAME), DBUS_CALL_TIMEOUT)
        bus.disconnect()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(_wait_for_disconnect(bus), DBUS_CALL_TIMEOUT)
        return 0
    log.error("lost the bus connection")
    return 1


async def _wait_for_disconnect(bus: MessageBus) -> None:
    await bus.wait_for_disconnect()  # type: ignore[no-untyped-call]


def main(argv: Sequence[str] | None = None, armer: Armer | None = None) -> int:
    """The daemon. `armer`: what runs the sleep cycle (default: the helper, through
    systemd); the integration tests pass one that only records."""
    args = parse_args(argv)
    # Before anything else: no child may inherit NOTIFY_SOCKET.
    notifier = Notifier.from_environment()
    setup_logging(args.log_target, args.debug)
    try:
        return asyncio.run(serve(args, notifier, armer))
    except CryptlockdError as e:
        log.error("%s", e)
        return 1


if __name__ == "__main__":
    sys.exit(main())
