"""The test bed itself: a guest with root on LUKS, stock suspend/wake, and the original race."""

from __future__ import annotations

import struct
import time

import pytest

from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.memscan import count_occurrences

pytestmark = [pytest.mark.vm, pytest.mark.asyncio, pytest.mark.timeout(900)]

SUSPEND_DEADLINE = 30.0
WAKE_DEADLINE = 60.0
# How long the race test insists that no SUSPEND arrives while the device is LUKS-suspended.
# Stock suspend reaches SUSPEND in well under a second here, so 10 s is a wide margin.
RACE_HOLD = 10.0
# The writer's kernel stack while it hangs (6.1): ... blkdev_issue_flush <- ext4_sync_fs <-
# iterate_supers <- ksys_sync <- ksys_sync_helper <- pm_suspend <- state_store.
SYNC_FRAME = "ksys_sync"


async def assert_usable(guest: Guest) -> None:
    """Writes and reads back 1 MiB with direct I/O on the root and the data file system: pages
    in the page cache could be read even from a suspended device, direct I/O cannot."""
    for directory in ("/var/tmp", layout.DATA_MOUNT):
        await guest.run(
            f"head -c 1048576 /dev/urandom > /run/probe.src && "
            f"dd if=/run/probe.src of={directory}/probe bs=64k oflag=direct status=none && "
            f"dd if={directory}/probe bs=64k iflag=direct status=none | cmp - /run/probe.src",
            timeout=60,
        )


async def test_guest_boots_with_root_on_luks(guest: Guest) -> None:
    root_source = (await guest.run("findmnt -n -o SOURCE /")).stdout.strip()
    assert root_source == f"/dev/mapper/{layout.ROOT_DM_NAME}"
    tree = (
        await guest.run(
            f"lsblk -J -o NAME,TYPE,FSTYPE,MOUNTPOINT {layout.ROOT_DISK} {layout.DATA_DISK}"
        )
    ).json()
    by_disk = {d["name"]: d for d in tree["blockdevices"]}
    for disk, dm, mount in (
        ("vda", layout.ROOT_DM_NAME, "/"),
        ("vdb", layout.DATA_DM_NAME, layout.DATA_MOUNT),
    ):
        assert by_disk[disk]["fstype"] == "crypto_LUKS", by_disk[disk]
        child = by_disk[disk]["children"][0]
        assert (child["name"], child["type"], child["mountpoint"]) == (dm, "crypt", mount)
    status = (await guest.run(f"cryptsetup status {layout.ROOT_DM_NAME}")).stdout
    assert "type:    LUKS2" in status and "aes-xts-plain64" in status, status
    table = (await guest.run(f"dmsetup table {layout.ROOT_DM_NAME}")).stdout.split()
    assert table[2] == "crypt", table
    # Commands: exit status and both streams come back separately.
    result = await guest.run("echo out; echo err >&2; exit 3", check=False)
    assert (result.rc, result.stdout, result.stderr) == (3, "out\n", "err\n")
    echoed = await guest.run(["cat"], input=b"\x00binary\xff")
    assert echoed.stdout_bytes == b"\x00binary\xff"
    print(f"booted to the agent in {guest.boot_seconds:.1f} s ({guest.accel})")


async def test_baseline_suspend_wake(guest: Guest) -> None:
    """Stock systemd suspend, without cryptlockd: the benchmark baseline."""
    mark = guest.event_mark()
    start = time.monotonic()
    await guest.spawn("systemctl suspend", "/run/suspend.log")
    suspended = await guest.wait_event("SUSPEND", SUSPEND_DEADLINE, since=mark)
    to_suspend = suspended.monotonic - start
    assert await guest.status() == "suspended"
    mark = guest.event_mark()
    wake_start = time.monotonic()
    await guest.wakeup()
    await guest.wait_event("WAKEUP", WAKE_DEADLINE, since=mark)
    await guest.wait_agent(WAKE_DEADLINE, what="after wake-up")
    to_agent = time.monotonic() - wake_start
    await assert_usable(guest)
    journal = (await guest.run("journalctl -b --no-pager -o cat -k")).stdout
    assert "PM: suspend exit" in journal
    print(
        f"baseline: systemctl suspend -> QMP SUSPEND {to_suspend:.2f} s; "
        f"system_wakeup -> agent answers {to_agent:.2f} s ({guest.accel})"
    )


async def _writer_stack(guest: Guest, pid: int) -> str:
    result = await guest.run(f"cat /proc/{pid}/stack", check=False, timeout=10)
    return result.stdout


async def test_original_race_sync_hangs_on_luks_suspended_device(guest: Guest) -> None:
    """Regression guard for the bug cryptlockd exists to avoid: with sync_on_suspend=1 and a
    mounted LUKS device suspended, `echo mem > /sys/power/state` hangs in the kernel's sync,
    before the freezer (so the agent still answers), and the machine never sleeps."""
    data = layout.DATA_DM_NAME
    await guest.run("echo 1 > /sys/power/sync_on_suspend")
    # Dirty pages on the soon-suspended device, so the sync has something to write.
    await guest.run(f"head -c 4194304 /dev/urandom > {layout.DATA_MOUNT}/dirty")
    await guest.run(f"cryptsetup luksSuspend {data}")
    assert "(suspended)" in (await guest.run(f"cryptsetup status {data}")).stdout
    mark = guest.event_mark()
    writer = await guest.spawn("echo mem > /sys/power/state", "/run/race.log")

    # First the writer flushes its dirty pages; then it reaches the device flush and stays.
    await guest.wait_for_command(
        f"cat /proc/{writer}/stack",
        30,
        f"writer {writer} blocks in the kernel's sync",
        ok=lambda stack: SYNC_FRAME in stack,
    )

    with pytest.raises(AssertionError, match="no QMP SUSPEND event"):
        await guest.wait_event("SUSPEND", RACE_HOLD, since=mark)
    assert await guest.status() == "running"
    stack = await _writer_stack(guest, writer)
    assert SYNC_FRAME in stack, f"writer left the sync without the key:\n{stack}"
    state = (await guest.run(f"grep ^State: /proc/{writer}/status")).stdout
    assert "D (disk sleep)" in state, state
    print(
        f"writer {writer} still in the kernel's sync after {RACE_HOLD:.0f} s, no SUSPEND:\n{stack}"
    )

    # Unblock: the key comes back, the sync completes, and the pending suspend happens now.
    # Started in the background: the agent is frozen before it could answer.
    await guest.spawn(
        f"cryptsetup luksResume --key-file {layout.DATA_KEYFILE} {data}", "/run/resume.log"
    )
    await guest.wait_event("SUSPEND", SUSPEND_DEADLINE, since=mark)
    mark = guest.event_mark()
    await guest.wakeup()
    await guest.wait_event("WAKEUP", WAKE_DEADLINE, since=mark)
    await guest.wait_agent(WAKE_DEADLINE, what="after wake-up")
    status = (await guest.run(f"cryptsetup status {data}")).stdout
    assert "(suspended)" not in status, status
    assert (await guest.run("cat /run/resume.log")).stdout == ""
    await assert_usable(guest)


async def test_ram_dump_scanner_counts_strings(guest: Guest) -> None:
    """The RAM dump holds guest memory: a marker kept in guest RAM (a tmpfs file) is found, a
    string that never entered the guest is not."""
    marker = b"cryptlockd-marker-" + b"7f3a9c" * 4
    absent = b"absent-" + bytes(range(1, 28))
    await guest.run(["sh", "-c", "cat > /dev/shm/marker"], input=marker * 3)
    dump = await guest.dump_memory()
    try:
        size = dump.stat().st_size
        counts = count_occurrences(dump, [marker, absent])
    finally:
        dump.unlink()
    assert size >= layout.GUEST_MEMORY_MIB * 1024 * 1024
    assert counts[marker] >= 3, counts
    assert counts[absent] == 0, counts


async def test_typing_on_the_vt_and_screendump(guest: Guest) -> None:
    """send-key types on tty1 (root is logged in there on the test guest), capitals and
    symbols included; screendump saves the framebuffer as PNG."""
    await guest.wait_for_command("pgrep -t tty1 bash", 60, "a root shell on tty1")
    await guest.type_text(f"echo '{layout.PASSPHRASE}' > /run/typed")
    typed = await guest.wait_for_command("cat /run/typed", 30, "the typed line")
    assert typed.stdout == layout.PASSPHRASE + "\n"
    png = await guest.screendump("tty1")
    header = png.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", header[16:24])
    assert width >= 640 and height >= 400, (width, height)
