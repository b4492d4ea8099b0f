"""The hotplug monitor: which uevents matter, and that events reach on_change through the
asyncio loop (a fake monitor on a real pipe, and the real kernel netlink socket)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import pytest

from cryptlockd.daemon.udev_monitor import DeviceMonitor, is_relevant
from tests.wait import wait_until_async

LUKS = {
    "DM_UUID": "CRYPT-LUKS2-" + "a" * 32 + "-cryptroot",
    "DM_NAME": "cryptroot",
    "DEVNAME": "/dev/dm-0",
}


def test_relevance() -> None:
    assert is_relevant("add", LUKS)
    assert is_relevant("change", LUKS)  # suspend/resume state
    assert is_relevant("remove", LUKS)
    lv = {"DM_UUID": "LVM-" + "b" * 64, "DM_NAME": "vg-root", "DEVNAME": "/dev/dm-1"}
    assert is_relevant("add", lv)  # may be a new holder of a LUKS device
    assert not is_relevant("change", lv)
    assert is_relevant("remove", {"DEVNAME": "/dev/dm-3", "MAJOR": "253"})  # kernel remove
    assert not is_relevant("add", {"DEVNAME": "/dev/sda1"})
    assert not is_relevant("change", {"DEVNAME": "/dev/loop0"})
    assert not is_relevant("add", {"DM_UUID": "CRYPT-PLAIN-swap", "DEVNAME": "swap"})


@dataclass
class FakeDevice:
    action: str
    properties: Mapping[str, str]


@dataclass
class FakeMonitor:
    """pyudev.Monitor's surface on a real pipe, so the loop's reader really fires."""

    queue: list[FakeDevice] = field(default_factory=list)
    started: bool = False

    def __post_init__(self) -> None:
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)

    def start(self) -> None:
        self.started = True

    def fileno(self) -> int:
        return self.r

    def poll(self, timeout: float | None = None) -> Any:
        try:
            os.read(self.r, 1)
        except BlockingIOError:
            return None
        return self.queue.pop(0)

    def emit(self, *devices: FakeDevice) -> None:
        for d in devices:
            self.queue.append(d)
            os.write(self.w, b"x")

    def close(self) -> None:
        os.close(self.r)
        os.close(self.w)


@pytest.mark.asyncio
async def test_burst_gives_one_change_and_irrelevant_events_none() -> None:
    fake = FakeMonitor()
    calls: list[int] = []
    mon = DeviceMonitor(lambda: calls.append(1), monitor_factory=lambda source: fake)
    mon.start(asyncio.get_running_loop())
    try:
        assert fake.started and mon.running
        fake.emit(FakeDevice("change", {"DEVNAME": "/dev/sda"}))
        await wait_until_async(lambda: mon.events_seen == 1)
        assert calls == []
        lv = {"DM_NAME": "vg-x", "DEVNAME": "/dev/dm-2"}
        fake.emit(FakeDevice("add", LUKS), FakeDevice("add", lv), FakeDevice("add", lv))
        await wait_until_async(lambda: mon.events_seen == 4)
        assert calls == [1]
    finally:
        mon.stop()
        fake.close()
    assert not mon.running


@pytest.mark.asyncio
async def test_handler_errors_do_not_stop_the_monitor() -> None:
    fake = FakeMonitor()
    calls: list[int] = []

    def boom() -> None:
        calls.append(1)
        raise RuntimeError("rediscovery failed")

    mon = DeviceMonitor(boom, monitor_factory=lambda source: fake)
    mon.start(asyncio.get_running_loop())
    try:
        fake.emit(FakeDevice("add", LUKS))
        await wait_until_async(lambda: len(calls) == 1)
        fake.emit(FakeDevice("remove", LUKS))
        await wait_until_async(lambda: len(calls) == 2)
    finally:
        mon.stop()
        fake.close()


@pytest.mark.asyncio
async def test_stop_removes_the_reader() -> None:
    fake = FakeMonitor()
    calls: list[int] = []
    mon = DeviceMonitor(lambda: calls.append(1), monitor_factory=lambda source: fake)
    loop = asyncio.get_running_loop()
    mon.start(loop)
    mon.stop()
    mon.stop()  # idempotent
    try:
        fake.emit(FakeDevice("add", LUKS))
        await asyncio.sleep(0.1)  # a negative check: nothing may arrive; not synchronisation
        assert calls == [] and mon.events_seen == 0
        assert not loop.remove_reader(fake.r)  # no reader was left behind
    finally:
        fake.close()


UEVENT = "/sys/class/block/loop0/uevent"


@pytest.mark.asyncio
async def test_real_kernel_uevent_reaches_on_change() -> None:
    # A synthetic "change" uevent on loop0 travels the real path: kernel -> netlink ->
    # pyudev -> add_reader -> on_change. (LUKS add/remove is proven in the QEMU guest.)
    if not os.access(UEVENT, os.W_OK):
        pytest.skip(f"{UEVENT} is not writable here (needs root and a loop device)")
    calls: list[int] = []

    def loop0(action: str | None, props: Mapping[str, str]) -> bool:
        return props.get("DEVNAME") == "/dev/loop0" and action == "change"

    mon = DeviceMonitor(lambda: calls.append(1), source="kernel", relevant=loop0)
    try:
        mon.start(asyncio.get_running_loop())
    except OSError as e:
        pytest.skip(f"no netlink uevent socket here: {e}")
    try:
        with open(UEVENT, "w") as f:
            f.write("change")
        await wait_until_async(lambda: calls != [])
    finally:
        mon.stop()
