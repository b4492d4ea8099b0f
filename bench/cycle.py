"""Benchmark of the protected sleep cycle in the QEMU guest. Prints its figures as Markdown
tables, ready for bench/RESULTS.md:

- delay-lock close (`arm_seconds`: the daemon's arm request to the helper's `armed`;
  target 1 s, logind's limit 5 s), and the helper's own arming step by step;
- each step of the cycle's timeline;
- trigger to QMP SUSPEND, protected against stock `systemd-sleep` (daemon stopped), in the
  same guest;
- the RAM filesystem's size and the helper's locked memory.

Scenarios: `systemctl suspend` on a quiet guest, then with a busy fsync writer on the
encrypted root, then the stock sleep. Run: `make bench` (BENCH_CYCLES=5 cycles each;
CRYPTLOCKD_VM_SUITE=bookworm|trixie picks the guest release).
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import shutil
import statistics
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.vm import image as image_mod
from tests.vm import layout, machine
from tests.vm.guest import Guest, artifacts_dir
from tests.vm.install import build_installed_layer
from tests.vm.sleepcycle import (
    WRITER_PATTERN,
    armed_ready,
    assert_complete,
    last_cycle,
    run_cycle,
    start_writer,
    suspend,
    wake,
)

# Intervals of the timeline worth a row: (label, from step, to step).
INTERVALS = [
    ("arm request -> helper starts arming", "arm_requested", "helper_arm"),
    ("  mlockall + not dumpable", "helper_arm", "helper_hardened"),
    ("  crypt_init_by_name of each device", "helper_hardened", "helper_devices_loaded"),
    ("  KDF reserve faulted in", "helper_devices_loaded", "helper_kdf_reserved"),
    ("  VT open", "helper_kdf_reserved", "helper_armed"),
    ("helper armed -> delay lock closed", "helper_armed", "armed"),
    ("delay lock closed -> sleep entry begins", "armed", "begin"),
    ("begin -> synced (sync, nothing frozen yet)", "begin", "synced"),
    ("synced -> cgroups frozen", "synced", "frozen"),
    ("frozen -> file systems synced (syncfs)", "frozen", "filesystems_synced"),
    ("file systems synced -> devices suspended and verified", "filesystems_synced", "verified"),
    ("verified -> sleep write", "verified", "sleep_write"),
    ("woke -> prompt", "woke", "prompt"),
    ("passphrase entered -> root resumed", "passphrase_entered", f"resumed:{layout.ROOT_DM_NAME}"),
    (
        "root resumed -> data resumed (keyfile)",
        f"resumed:{layout.ROOT_DM_NAME}",
        f"resumed:{layout.DATA_DM_NAME}",
    ),
    ("data resumed -> thawed", f"resumed:{layout.DATA_DM_NAME}", "thawed"),
    ("thawed -> finished", "thawed", "finished"),
]


def stats(values: Sequence[float]) -> str:
    if not values:
        return "n/a | n/a | n/a"
    return f"{statistics.median(values):.3f} | {min(values):.3f} | {max(values):.3f}"


async def protected_cycles(g: Guest, n: int) -> list[tuple[float, dict[str, Any]]]:
    out = []
    for _ in range(n):
        await armed_ready(g)
        cycle = await run_cycle(g, [layout.PASSPHRASE], "systemctl suspend")
        rec = await last_cycle(g, cycle.since)
        assert_complete(rec)
        to_suspend = cycle.to_suspend
        out.append((to_suspend, rec))
        t = rec["timeline_ms"]
        arming = ", ".join(
            f"{b.removeprefix('helper_')} +{t[b] - t[a]:.0f}"
            for _, a, b in INTERVALS[:6]
            if a in t and b in t
        )
        print(
            f"  cycle: trigger->SUSPEND {to_suspend:.2f} s, arm {rec['arm_seconds']} s "
            f"(ms: {arming})",
            flush=True,
        )
    return out


async def stock_cycles(g: Guest, n: int) -> list[float]:
    await g.run("systemctl stop cryptlockd.service")
    out = []
    for _ in range(n):
        out.append(await suspend(g, "systemctl suspend"))
        await wake(g, what="the stock sleep")
        print(f"  stock: trigger->SUSPEND {out[-1]:.2f} s", flush=True)
    await g.run("systemctl start cryptlockd.service")
    return out


def report(scenario: str, cycles: list[tuple[float, dict[str, Any]]]) -> None:
    print(f"\n### {scenario} ({len(cycles)} cycles)\n")
    print("| figure (s) | median | min | max |\n| --- | --- | --- | --- |")
    print(
        f"| **delay-lock close (arm_seconds)** | "
        f"{stats([float(r['arm_seconds']) for _, r in cycles])} |"
    )
    print(f"| trigger -> QMP SUSPEND | {stats([t for t, _ in cycles])} |")
    for label, a, b in INTERVALS:
        values = [
            (r["timeline_ms"][b] - r["timeline_ms"][a]) / 1000
            for _, r in cycles
            if a in r["timeline_ms"] and b in r["timeline_ms"]
        ]
        print(f"| {label} | {stats(values)} |")


async def bench(n: int) -> int:
    img = image_mod.ensure_image()
    accel = machine.choose_accel(img.kernel, image_mod.cache_root())
    workdir = artifacts_dir(img.suite) / "bench"
    shutil.rmtree(workdir, ignore_errors=True)
    layer = await build_installed_layer(img, accel, workdir / "installed")
    if not layer.ok:
        print(f"make install failed in the guest:\n{layer.log[-4000:]}")
        return 1
    guest = Guest(
        img, layer.disks.overlay(workdir / "disks"), workdir / "guest", accel, name="bench"
    )
    try:
        await guest.start()
        g = guest
        return await measure(g, img, accel, n)
    except Exception:
        if guest.running:
            journal = await guest.journal(timeout=30)
            print("---- guest journal, cryptlockd and logind ----")
            print(
                "\n".join(
                    line
                    for line in journal.splitlines()
                    if "cryptlockd" in line or "logind" in line or "sleep" in line
                )
            )
        raise
    finally:
        await guest.close()
        for disks in (workdir / "disks", workdir / "installed" / "disks"):
            shutil.rmtree(disks, ignore_errors=True)


async def measure(g: Guest, img: image_mod.TestbedImage, accel: str, n: int) -> int:
    await armed_ready(g)
    quiet = await protected_cycles(g, n)
    await start_writer(g)
    busy = await protected_cycles(g, n)
    await g.run(f"pkill -f '{WRITER_PATTERN}'")
    stock = await stock_cycles(g, n)
    ramfs = (await g.run("du -sk /run/cryptlockd/ramfs | cut -f1")).stdout.strip()
    check = (await g.run("cryptlockctl check || true")).stdout
    kernel = (await g.run("uname -r")).stdout.strip()
    lib = (await g.run("dpkg-query -W -f='${Version}' libcryptsetup12")).stdout.strip()

    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    print(
        f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: Debian {img.suite} "
        f"guest (kernel {kernel}, libcryptsetup {lib})\n"
    )
    print(
        f"Host: {os.cpu_count()} cores ({cpu}), kernel {platform.release()}; QEMU "
        f"{accel.upper()}, {layout.GUEST_MEMORY_MIB} MiB guest; `python -m bench.cycle`."
    )
    print("Timeline figures are intervals between cycle-record steps (CLOCK_BOOTTIME).")
    report("systemctl suspend, quiet guest", quiet)
    report("systemctl suspend, busy fsync writer on the encrypted root", busy)
    print(f"\n### Stock systemd-sleep, daemon stopped ({len(stock)} sleeps)\n")
    print(f"| trigger -> QMP SUSPEND (s) | {stats(stock)} |\n| --- | --- |")
    helper = quiet[-1][1].get("helper", {})
    print(
        f"\nRAM filesystem: {int(ramfs) / 1024:.1f} MiB (target 48 MiB). Helper while armed: "
        f"VmLck {helper.get('VmLck')}, VmRSS {helper.get('VmRSS')}, KDF reserve "
        f"{quiet[-1][1].get('kdf_reserve_kib')} KiB."
    )
    print("`cryptlockctl check` in the guest:\n")
    print("\n".join(f"    {line}" for line in check.rstrip().splitlines()))
    return 0


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    n = int(os.environ.get("BENCH_CYCLES", "5"))
    return asyncio.run(bench(n))


if __name__ == "__main__":
    sys.exit(main())
