"""Hotplug through the real udev path: a umockdev testbed provides /sys and sends uevents,
the REAL daemon (under umockdev's LD_PRELOAD) receives them through pyudev on its event
loop, rediscovers, and Devices plus PropertiesChanged follow. Only the kernel is faked."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from dbus_fast.aio import MessageBus

from tests.fakesys import CRYPTDATA_ON_VDB, UUID_A, UUID_B, luks_dm_uuid
from tests.integration.conftest import (
    MOCK_PYTHON,
    DaemonFactory,
    LogindMock,
    PolkitMock,
    SystemBus,
)
from tests.integration.support import (
    device_names_signalled,
    devices,
    get_property,
    watch_properties,
)
from tests.wait import wait_until_async

PRELOAD = "libumockdev-preload.so.0"
TESTBED = Path(__file__).with_name("umockdev_testbed.py")


def umockdev_missing() -> str | None:
    probe = subprocess.run(
        [MOCK_PYTHON, "-c", "import gi; gi.require_version('UMockdev', '1.0')"],
        capture_output=True,
        text=True,
        check=False,
        timeout=30,
    )
    if probe.returncode != 0:
        return "umockdev's GObject bindings (gir1.2-umockdev-1.0) are not installed"
    return None


class UmockdevBed:
    def __init__(self) -> None:
        self.proc = subprocess.Popen(
            [MOCK_PYTHON, str(TESTBED)],
            env=dict(os.environ, LD_PRELOAD=PRELOAD),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.root = Path(self._answer()["root"])

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        assert line, "the umockdev testbed process died"
        answer: dict[str, Any] = json.loads(line)
        assert "error" not in answer, answer
        return answer

    def _cmd(self, **cmd: Any) -> Any:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        return self._answer()["result"]

    @property
    def env(self) -> dict[str, str]:
        return {"LD_PRELOAD": PRELOAD, "UMOCKDEV_DIR": str(self.root)}

    def add(
        self,
        name: str,
        devno: str,
        parent: str | None = None,
        dm: tuple[str, str] | None = None,
        slaves: tuple[str, ...] = (),
    ) -> str:
        attrs = ["dev", devno]
        props = [
            "DEVNAME",
            f"/dev/{name}",
            "MAJOR",
            devno.split(":")[0],
            "MINOR",
            devno.split(":")[1],
        ]
        if dm is not None:
            attrs += ["dm/name", dm[0], "dm/uuid", dm[1], "dm/suspended", "0"]
            props += ["DM_NAME", dm[0], "DM_UUID", dm[1]]
        syspath: str = self._cmd(op="add", name=name, parent=parent, attrs=attrs, props=props)
        assert syspath, f"umockdev refused {name}"
        # Stacking, as the kernel shows it: slaves/ below, holders/ above.
        here = self.root / syspath.lstrip("/")
        (here / "slaves").mkdir(exist_ok=True)
        for below in slaves:
            there = self.root / below.lstrip("/")
            (there / "holders").mkdir(exist_ok=True)
            os.symlink(os.path.relpath(there, here / "slaves"), here / "slaves" / there.name)
            os.symlink(os.path.relpath(here, there / "holders"), there / "holders" / name)
        return syspath

    def uevent(self, syspath: str, action: str) -> None:
        self._cmd(op="uevent", path=syspath, action=action)

    def unplug(self, syspath: str) -> None:
        """Kernel order: the device leaves sysfs, then the remove uevent goes out. umockdev
        needs the device for the uevent, so only its class link goes first."""
        here = self.root / syspath.lstrip("/")
        for below in os.listdir(here / "slaves"):
            (here / "slaves" / below).resolve().joinpath("holders", here.name).unlink()
        (self.root / "sys" / "class" / "block" / here.name).unlink()
        self.uevent(syspath, "remove")

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def testbed() -> Iterator[UmockdevBed]:
    missing = umockdev_missing()
    if missing:
        pytest.skip(missing)
    tb = UmockdevBed()
    yield tb
    tb.close()


async def names(client: MessageBus) -> list[str]:
    return [d[0] for d in await get_property(client, "Devices")]


@pytest.mark.asyncio
async def test_hotplug_add_and_remove_reach_devices(
    system_bus: SystemBus,
    logind: LogindMock,
    polkit: PolkitMock,
    start_daemon: DaemonFactory,
    tmp_path: Path,
    testbed: UmockdevBed,
    client: MessageBus,
) -> None:
    vda = testbed.add("vda", "252:0")
    vda2 = testbed.add("vda2", "252:2", parent=vda)
    root = testbed.add(
        "dm-0", "253:0", dm=("cryptroot", luks_dm_uuid(UUID_A, "cryptroot")), slaves=(vda2,)
    )
    mountinfo = tmp_path / "mountinfo"
    mountinfo.write_text("27 1 253:0 / / rw,relatime shared:1 - ext4 /dev/mapper/cryptroot rw\n")
    crypttab = tmp_path / "crypttab"
    crypttab.write_text(f"cryptdata UUID={UUID_B} /etc/keys/data.key luks\n")

    # --sysfs stays /sys: the preload library redirects it to the testbed.
    await asyncio.to_thread(
        start_daemon,
        *("--mountinfo", str(mountinfo), "--crypttab", str(crypttab)),
        env=testbed.env,
        udev=True,
    )
    assert await names(client) == ["cryptroot"]
    seen = await watch_properties(client)

    # A second LUKS disk appears.
    vdb = testbed.add("vdb", "252:16")
    data = testbed.add(
        "dm-1", "253:1", dm=("cryptdata", luks_dm_uuid(UUID_B, "cryptdata")), slaves=(vdb,)
    )
    testbed.uevent(data, "add")
    await wait_until_async(
        lambda: _eq(names(client), ["cryptdata", "cryptroot"]), message="Devices after the add"
    )
    await wait_until_async(
        lambda: ["cryptdata", "cryptroot"] in device_names_signalled(seen),
        message="PropertiesChanged with cryptdata",
    )
    got = {d[0]: d for d in devices(await get_property(client, "Devices"))}
    assert got["cryptdata"] == CRYPTDATA_ON_VDB

    # An LVM volume is activated on top of cryptroot: its holders change.
    lv = testbed.add("dm-2", "253:2", dm=("vg-home", "LVM-" + "c" * 64), slaves=(root,))
    testbed.uevent(lv, "add")

    async def holders_of_root() -> list[str]:
        found = {d[0]: d for d in devices(await get_property(client, "Devices"))}
        return list(found["cryptroot"][7])

    await wait_until_async(
        lambda: _eq(holders_of_root(), ["vg-home"]), message="cryptroot's holders after the LV add"
    )

    # The second disk goes away.
    testbed.unplug(data)
    await wait_until_async(
        lambda: _eq(names(client), ["cryptroot"]), message="Devices after the remove"
    )
    await wait_until_async(
        lambda: device_names_signalled(seen)[-1] == ["cryptroot"],
        message="PropertiesChanged after the remove",
    )


async def _eq(value: Any, expected: Any) -> bool:
    return bool(await value == expected)
