"""org.cryptlockd1.Manager on the bus: the properties, the methods (privileged ones after a
polkit check), PropertiesChanged and CycleFinished. The behaviour is the manager's
(manager.py); the interface is the introspection XML's (exported_object.py)."""

from __future__ import annotations

import logging
from typing import Any

from dbus_fast import Message
from dbus_fast.aio import MessageBus

from cryptlockd import __version__
from cryptlockd.daemon import polkit, suspend_rights
from cryptlockd.daemon.armer import CycleRecord
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.daemon.exported_object import ExportedObject, to_vardict
from cryptlockd.daemon.lock_cycle import LockCycle
from cryptlockd.daemon.manager import Manager
from cryptlockd.daemon.metrics import STATE_FILE, TextfileMetrics
from cryptlockd.defs import (
    DBUS_CALL_TIMEOUT,
    DEVICE_FIELDS,
    INTROSPECTION_XML,
    OBJECT_PATH,
    POLKIT_ACTION_CONFIGURE,
    POLKIT_ACTION_LOCK,
    POLKIT_ACTION_SUSPEND,
)
from cryptlockd.errors import NoSuchDevice

__all__ = ["Service", "device_struct"]

log = logging.getLogger("cryptlockd")

# The properties whose changes are announced with PropertiesChanged (Version never changes).
ANNOUNCED = ("Enabled", "Protected", "Problems", "State", "Devices", "LastCycle")


def device_struct(d: LuksDevice) -> list[Any]:
    """(ssssbbsas), in the order the XML documents."""
    return [list(v) if isinstance(v, tuple) else v for v in (getattr(d, f) for f in DEVICE_FIELDS)]


class Service:
    """Exports `manager` at /org/cryptlockd1 and announces its changes (its Listener)."""

    def __init__(self, bus: MessageBus, manager: Manager, polkit_timeout: float) -> None:
        self.bus = bus
        self.manager = manager
        self.polkit_timeout = polkit_timeout
        self.obj = ExportedObject(
            bus,
            OBJECT_PATH,
            INTROSPECTION_XML.read_text(),
            self.get_property,
            {
                "Suspend": self.m_suspend,
                "Lock": self.m_lock,
                "SetEnabled": self.m_set_enabled,
                "Reload": self.m_reload,
                "Check": self.m_check,
                "GetDevice": self.m_get_device,
            },
        )
        manager.listener = self
        # Lock(): a cycle without the sleep, ending in manager.back_to_idle() like a sleep.
        self.lock_cycle = LockCycle(manager)
        self.metrics = TextfileMetrics(manager.root / STATE_FILE.relative_to("/"))

    def start(self) -> None:
        self.obj.start()

    def write_metrics(self) -> None:
        m = self.manager
        plain = {
            "Protected": m.protected,
            "Enabled": m.enabled,
            "Problems": list(m.problems),
            "LastCycle": m.last_cycle,
        }
        self.metrics.write(m.config.metrics.textfile, plain)

    def stop(self) -> None:
        self.obj.stop()

    # --- properties and signals ------------------------------------------------------

    def get_property(self, name: str) -> Any:
        m = self.manager
        match name:
            case "Version":
                return __version__
            case "Enabled":
                return m.enabled
            case "Protected":
                return m.protected
            case "Problems":
                return list(m.problems)
            case "State":
                return m.state.value
            case "Devices":
                return [device_struct(d) for d in m.devices]
            case "LastCycle":
                return to_vardict(m.last_cycle)
        raise KeyError(name)

    def snapshot(self) -> dict[str, Any]:
        return {n: self.get_property(n) for n in ANNOUNCED}

    def properties_changed(self, names: list[str]) -> None:
        self.obj.emit_properties_changed(names)
        self.write_metrics()

    def cycle_finished(self, success: bool, record: CycleRecord) -> None:
        self.obj.emit_signal("CycleFinished", [success, to_vardict(record)])
        self.metrics.cycle_finished(record)
        self.write_metrics()

    # --- methods ---------------------------------------------------------------------

    async def _authorize(self, msg: Message, action: str) -> None:
        await polkit.require(self.bus, msg.sender, action, self.polkit_timeout)

    async def m_suspend(self, msg: Message, args: list[Any]) -> list[Any]:
        await self._authorize(msg, POLKIT_ACTION_SUSPEND)

        async def caller_rights() -> int:
            # logind's rules for the caller, as if it had asked logind itself.
            return await suspend_rights.caller_rights(
                self.bus, msg.sender, DBUS_CALL_TIMEOUT, self.polkit_timeout
            )

        await self.manager.cycle.suspend(msg.sender, caller_rights)
        return []

    async def m_lock(self, msg: Message, args: list[Any]) -> list[Any]:
        await self._authorize(msg, POLKIT_ACTION_LOCK)
        await self.lock_cycle.lock(msg.sender)
        return []

    async def m_set_enabled(self, msg: Message, args: list[Any]) -> list[Any]:
        await self._authorize(msg, POLKIT_ACTION_CONFIGURE)
        self.manager.set_enabled(bool(args[0]), msg.sender)
        return []

    async def m_reload(self, msg: Message, args: list[Any]) -> list[Any]:
        await self._authorize(msg, POLKIT_ACTION_CONFIGURE)
        self.manager.reload()
        self.write_metrics()  # the file's path may be what changed
        return []

    async def m_check(self, msg: Message, args: list[Any]) -> list[Any]:
        self.manager.refresh()
        return [[r.as_dbus() for r in self.manager.check_results]]

    async def m_get_device(self, msg: Message, args: list[Any]) -> list[Any]:
        name = args[0]
        device = self.manager.device(name)
        if device is None:
            raise NoSuchDevice(f"no LUKS device named {name[:100]!r}")
        return [device_struct(device)]
