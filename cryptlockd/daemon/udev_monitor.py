"""Block-device hotplug in the daemon's event loop.

pyudev has no asyncio support, so the monitor's netlink socket goes to `loop.add_reader`.
Only events that can change the LUKS picture call `on_change`, once per batch of queued
events; the daemon then rediscovers from sysfs, which stays the single source of truth.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import Any, Protocol

__all__ = ["DeviceMonitor", "is_relevant"]

log = logging.getLogger(__name__)

LUKS_DM_UUID_PREFIXES = ("CRYPT-LUKS1-", "CRYPT-LUKS2-")


def is_relevant(action: str | None, properties: Mapping[str, str]) -> bool:
    """Whether a block uevent can change the list of LUKS devices or how they stack."""
    # match_property in udev is exact-match only, hence the prefix test here.
    if properties.get("DM_UUID", "").startswith(LUKS_DM_UUID_PREFIXES):
        return True
    # Any dm device coming or going may be a holder (an LVM LV) of a LUKS device. The
    # kernel's own remove uevent carries no DM_UUID, so a removed dm-N counts as well.
    devname = properties.get("DEVNAME", "")
    is_dm = "DM_NAME" in properties or devname.rsplit("/", 1)[-1].startswith("dm-")
    return is_dm and action in ("add", "remove")


class _Monitor(Protocol):
    """The part of pyudev.Monitor we use (tests pass a fake)."""

    def start(self) -> None: ...
    def fileno(self) -> int: ...
    def poll(self, timeout: float | None = None) -> Any: ...


def _udev_monitor(source: str) -> _Monitor:
    import pyudev

    monitor = pyudev.Monitor.from_netlink(pyudev.Context(), source=source)
    monitor.filter_by("block")
    return monitor  # type: ignore[no-any-return]


class DeviceMonitor:
    """`DeviceMonitor(on_change).start(loop)`; `stop()` when done.

    source: "udev" (events after udevd has processed them, the normal case) or "kernel"
    (raw uevents, for systems without udevd).
    """

    def __init__(
        self,
        on_change: Callable[[], None],
        *,
        source: str = "udev",
        relevant: Callable[[str | None, Mapping[str, str]], bool] = is_relevant,
        monitor_factory: Callable[[str], _Monitor] = _udev_monitor,
    ) -> None:
        self._on_change = on_change
        self._source = source
        self._relevant = relevant
        self._factory = monitor_factory
        self._monitor: _Monitor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.events_seen = 0

    @property
    def running(self) -> bool:
        return self._monitor is not None

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        if self._monitor is not None:
            return
        monitor = self._factory(self._source)
        monitor.start()
        loop.add_reader(monitor.fileno(), self._readable)
        self._monitor = monitor
        self._loop = loop
        log.debug("watching block devices (%s events)", self._source)

    def stop(self) -> None:
        if self._monitor is None or self._loop is None:
            return
        self._loop.remove_reader(self._monitor.fileno())
        # The socket closes with the monitor object; drop our only reference.
        self._monitor = None
        self._loop = None

    def _readable(self) -> None:
        monitor = self._monitor
        if monitor is None:
            return
        changed = False
        # Drain everything queued so a burst (an LVM activation adds several LVs) costs
        # one rediscovery, not one per event.
        while True:
            try:
                device = monitor.poll(timeout=0)
            except OSError as e:
                # ENOBUFS: the kernel dropped events. We cannot know which, so rediscover.
                log.warning("udev monitor: %s; rediscovering devices", e)
                changed = True
                break
            if device is None:
                break
            self.events_seen += 1
            props = device.properties
            action = device.action
            if self._relevant(action, props):
                changed = True
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("uevent %s %s", action, props.get("DEVNAME", "?"))
        if changed:
            try:
                self._on_change()
            except Exception:
                log.exception("device change handler failed")
