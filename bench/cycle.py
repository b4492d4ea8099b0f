"""`make bench`: stock `systemctl suspend`, Debian's cryptsetup-suspend and cryptlockd side by
side, each in a fresh boot of the same bookworm guest image, BENCH_CYCLES (5) cycles each on a
quiet guest and with a busy fsync writer on the encrypted root; then cryptlockd's idle cost
and the bus (bench/bus.py, on the host). Prints Markdown for bench/RESULTS.md and draws
bench/timeline.png.

- stock: the plain test-bed image (cryptlockd not installed: no drop-in, no daemon);
- debian: the same plain image with cryptsetup-suspend installed in its boot (bench/debian.py);
- cryptlockd: the image with `make install` done in a boot of its own (the installed layer).
"""

from __future__ import annotations

import asyncio
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import debian, idle, keyslots, runs, timeline
from bench.figures import (
    DATA,
    ROOT,
    CycleResult,
    argon2_table,
    forgotten_over_remembered,
    record_intervals,
    shared_over_paired,
    side_by_side,
    tried_text,
)
from tests.vm import image as image_mod
from tests.vm import layout, machine
from tests.vm.guest import DiskSet, Guest, artifacts_dir
from tests.vm.install import build_installed_layer
from tests.vm.sleepcycle import WRITER_PATTERN, armed_ready, devices_key_source, start_writer

HERE = Path(__file__).resolve().parent
Runner = Callable[[Guest, str, int], Awaitable[CycleResult]]


async def cycles(g: Guest, run: Runner, n: int, out: list[CycleResult]) -> None:
    """n quiet cycles, then n with the busy writer (stopped afterwards)."""
    for mode in ("quiet", "busy"):
        if mode == "busy":
            await start_writer(g)
        for i in range(n):
            result = await run(g, mode, i)
            result.index = i
            out.append(result)
            figs = ", ".join(f"{k.split(' (')[0]} {v:.2f}" for k, v in result.figures().items())
            print(f"  {result.system} {mode} {i + 1}: {figs}", flush=True)
    await g.run(f"pkill -f '{WRITER_PATTERN}'", check=False)


async def boot(
    img: image_mod.TestbedImage, accel: str, disks: DiskSet, workdir: Path, name: str
) -> Guest:
    guest = Guest(img, disks.overlay(workdir / "disks"), workdir / "guest", accel, name=name)
    await guest.start()
    print(f"== {name}: booted in {guest.boot_seconds:.0f} s", flush=True)
    return guest


async def bench(n: int) -> int:
    img = image_mod.ensure_image()
    accel = machine.choose_accel(img.kernel, image_mod.cache_root())
    workdir = artifacts_dir(img.suite) / "bench"
    shutil.rmtree(workdir, ignore_errors=True)
    results: list[CycleResult] = []
    notes: list[str] = []
    facts: dict[str, str] = {}

    bus = subprocess.run(
        [sys.executable, "-m", "bench.bus", "--seconds", "5"], capture_output=True, text=True
    )
    print(bus.stdout, flush=True)

    only = os.environ.get("BENCH_SYSTEMS", "stock cryptlockd debian").split()
    g = await boot(img, accel, DiskSet.of_image(img), workdir / "stock", "stock")
    try:
        facts["kernel"] = (await g.run("uname -r")).stdout.strip()
        facts["systemd"] = (await g.run("dpkg-query -W -f='${Version}' systemd")).stdout
        facts["lib"] = (await g.run("dpkg-query -W -f='${Version}' libcryptsetup12")).stdout
        if "stock" in only:
            await cycles(g, runs.stock_cycle, n, results)
    finally:
        await g.close()

    idle_cost = None
    if "cryptlockd" in only:
        idle_cost = await run_cryptlockd(img, accel, workdir, n, results, notes, facts)
    if "debian" in only:
        await run_debian(img, accel, workdir, n, results, notes, facts)
    for disks in workdir.glob("*/disks"):
        shutil.rmtree(disks, ignore_errors=True)

    report(img, accel, n, results, facts, idle_cost, bus.stdout, notes)
    if len(only) == 3:
        timeline.draw(results, HERE / "timeline.png")
    print(f"\ntimeline: {HERE / 'timeline.png'}")
    return 0


async def run_cryptlockd(
    img: image_mod.TestbedImage,
    accel: str,
    workdir: Path,
    n: int,
    results: list[CycleResult],
    notes: list[str],
    facts: dict[str, str],
) -> dict[str, object] | None:
    layer = await build_installed_layer(img, accel, workdir / "installed")
    if not layer.ok:
        notes.append(f"make install failed in the guest:\n{layer.log[-4000:]}")
        return None
    g = await boot(img, accel, layer.disks, workdir / "cryptlockd", "cryptlockd")
    idle_cost = None
    try:
        await armed_ready(g)
        await asyncio.sleep(5)  # the start-up's last D-Bus traffic dies down
        try:
            idle_cost = await idle.measure(g)
        except Exception as exc:
            notes.append(f"idle cost: not measured: {exc!r}")
        ramfs = (await g.run("du -sk /run/cryptlockd/ramfs | cut -f1")).stdout.strip()
        facts["ramfs"] = f"{int(ramfs) / 1024:.1f} MiB"
        await cycles(g, runs.cryptlockd_cycle, n, results)
        # For the time between `thawed` and direct I/O answering: who ran after the thaw.
        journal = await g.run("journalctl -b -o short-monotonic --no-pager -n 400", check=False)
        (workdir / "cryptlockd-journal.txt").write_text(journal.stdout)
        await argon2_cases(g, max(3, n - 2), results, facts)
    except Exception as exc:
        notes.append(f"cryptlockd: the run stopped: {exc!r}")
        traceback.print_exc()
        print("---- console tail ----\n" + g.console_tail(40))
    finally:
        await g.close()
    return idle_cost


async def argon2_cases(g: Guest, n: int, out: list[CycleResult], facts: dict[str, str]) -> None:
    """The Argon2id cases, in the cryptlockd boot after its quiet and busy cycles, with a
    decoy argon2id keyslot in front of the passphrase's (bench/keyslots.py): n cycles with
    the keyslot forgotten (the daemon stopped and its keyslots.json removed before each:
    two KDFs), n with it remembered (one KDF), n with the daemon restarted before each (it
    remembers the keyslot from its file: one KDF), then n + 2 with data on the passphrase
    too (crypttab `none`), so that one Enter opens both."""
    kdfs = await keyslots.rearrange(g)
    facts["keyslots"] = keyslots.describe(kdfs)
    print(f"  root's keyslots: {facts['keyslots']}", flush=True)
    one = await keyslots.one_kdf_seconds(g)
    facts["one_kdf"] = ", ".join(f"{v:.2f}" for v in one)
    print(f"  one KDF (cryptsetup --test-passphrase, awake guest): {facts['one_kdf']} s")
    for i in range(n):
        await g.run(
            f"systemctl stop cryptlockd.service && rm -f {layout.KEYSLOTS_FILE} && "
            "systemctl start cryptlockd.service"
        )
        await argon2_cycle(g, "forgotten", i, out)
    # The last forgotten cycle's keyslot is remembered from here on.
    for i in range(n):
        await argon2_cycle(g, "remembered", i, out)
    for i in range(n):
        await g.run("systemctl restart cryptlockd.service")
        await argon2_cycle(g, "restarted", i, out)
    await g.run(f"cp /etc/crypttab {CRYPTTAB_SAVED}")
    # Two more: the first is left out of the ratio (data's keyslot not yet remembered).
    # Each later one is paired with a one-KDF cycle right after it (data back on its
    # keyfile), so that the ratio of the two does not depend on the host's speed drifting
    # over the minutes between the quiet cycles and these.
    for i in range(n + 2):
        await data_key_source(g, passphrase=True)
        await argon2_cycle(g, "shared", i, out)
        if i > 0:
            await data_key_source(g, passphrase=False)
            await argon2_cycle(g, "paired", i, out)
    two = await keyslots.two_kdfs_ratios(g)
    facts["two_kdfs"] = ", ".join(f"{v:.2f}" for v in two)
    print(f"  two KDFs at once over one, cryptsetup alone (awake guest): {facts['two_kdfs']}")


CRYPTTAB_SAVED = "/root/crypttab.bench"


async def data_key_source(g: Guest, passphrase: bool) -> None:
    """data on the passphrase (crypttab `none`) or back on its keyfile (the crypttab saved
    before), reloaded by the daemon."""
    if passphrase:
        edit = "sed -i 's|^data\\s\\+\\(\\S\\+\\)\\s\\+\\S\\+|data \\1 none|' /etc/crypttab"
        source = "passphrase"
    else:
        edit, source = f"cp {CRYPTTAB_SAVED} /etc/crypttab", f"keyfile:{layout.DATA_KEYFILE}"
    await g.run(
        f"{edit} && busctl call org.cryptlockd1 /org/cryptlockd1 org.cryptlockd1.Manager Reload"
    )
    await devices_key_source(g, DATA, source, f"data takes the {source}")


async def argon2_cycle(g: Guest, mode: str, i: int, out: list[CycleResult]) -> None:
    result = await runs.cryptlockd_cycle(g, mode, i)
    result.index = i
    out.append(result)
    print(f"  cryptlockd {mode} {i + 1}: {argon2_line(result)}", flush=True)


def argon2_line(result: CycleResult) -> str:
    """Enter -> each device resumed, and the keyslot that opened each (cycle record)."""
    t = result.record.get("timeline_ms", {})
    times = [
        f"Enter -> {step} {(t[step] - t['passphrase_entered']) / 1000:.2f}"
        for step in (f"resumed:{ROOT}", f"resumed:{DATA}")
        if step in t and "passphrase_entered" in t
    ]
    slots = result.record.get("keyslots", {})
    used = ", ".join(f"{name} keyslot {slot}" for name, slot in sorted(slots.items()))
    wrong = result.record.get("wrong_passphrases", 0)
    return (
        ", ".join(times)
        + f" ({used or 'no keyslot recorded'}; tried {tried_text(result.record)}; "
        + f"wrong passphrases {wrong})"
    )


async def run_debian(
    img: image_mod.TestbedImage,
    accel: str,
    workdir: Path,
    n: int,
    results: list[CycleResult],
    notes: list[str],
    facts: dict[str, str],
) -> None:
    g = await boot(img, accel, DiskSet.of_image(img), workdir / "debian", "debian")
    try:
        facts["debian"] = await debian.install(g, img.suite, workdir / "debian")
        print(f"  {facts['debian']}", flush=True)

        async def deb(g: Guest, mode: str, i: int) -> CycleResult:
            await debian.clear_vt(g)
            return await runs.debian_cycle(g, mode, i, workdir / "debian")

        await cycles(g, deb, n, results)
    except Exception as exc:
        notes.append(f"Debian cryptsetup-suspend: the run stopped: {exc!r}")
        traceback.print_exc()
        print("---- console tail ----\n" + g.console_tail(40))
        if g.running:
            journal = (await g.run("journalctl -b --no-pager | tail -60", check=False)).stdout
            print("---- journal tail ----\n" + journal)
    finally:
        await g.close()


def report(
    img: image_mod.TestbedImage,
    accel: str,
    n: int,
    results: list[CycleResult],
    facts: dict[str, str],
    idle_cost: dict[str, object] | None,
    bus: str,
    notes: list[str],
) -> None:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        "unknown CPU",
    )
    print(
        f"\n## {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}: Debian {img.suite} guest "
        f"(kernel {facts.get('kernel')}, systemd {facts.get('systemd')}, libcryptsetup "
        f"{facts.get('lib')})\n"
    )
    print(
        f"Host: {os.cpu_count()} cores ({cpu}), kernel {platform.release()}; QEMU "
        f"{accel.upper()}{tcg_mode(accel)}, {layout.GUEST_MEMORY_MIB} MiB, "
        f"{layout.GUEST_CPUS} vCPUs; "
        f"{n} cycles per system and mode. Each cell: median (min-max), and in bold the ratio "
        "of medians to stock."
    )
    for mode, title in (("quiet", "quiet guest"), ("busy", "busy fsync writer on the root")):
        print(f"\n### Side by side, {title}\n")
        print(side_by_side(results, mode))
    for mode in ("quiet", "busy"):
        print(f"\n### cryptlockd's cycle record, {mode} (intervals between steps)\n")
        print(record_intervals(results, mode))
    print("\n### cryptlockd, Argon2id keyslots (Enter -> resumed, from the cycle record)\n")
    print(argon2_table(results))
    if "keyslots" in facts:
        ratio = forgotten_over_remembered(results)
        print(
            f"\nRoot's keyslots in these cases: {facts['keyslots']}. Forgotten over remembered "
            f"(medians): {'-' if ratio is None else f'{ratio:.2f}'}. One KDF of slot "
            f"{keyslots.PASSPHRASE_SLOT} by `cryptsetup open --test-passphrase` in the awake "
            f"guest: {facts['one_kdf']} s."
        )
    pairs = shared_over_paired(results)
    if pairs:
        print(
            "\nEach shared cycle over the one-KDF cycle right after it (Enter -> all resumed "
            "over Enter -> root resumed): "
            + ", ".join(f"{v:.2f}" for v in pairs)
            + f"; median {statistics.median(pairs):.2f}."
        )
    if "two_kdfs" in facts:
        print(
            "\nThe guest's own cost of two KDFs at once, without cryptlockd: two `cryptsetup "
            "open --test-passphrase` started together (root's passphrase keyslot and data's, "
            "the same cost), the later one's time over the mean of the two run alone right "
            f"after: {facts['two_kdfs']}."
        )
    deb = [r for r in results if r.system == "debian"]
    if deb:
        retyped = sum(1 for r in deb if r.host.get("attempts", 1) > 1)
        print(f"\nDebian: passphrase typed again in {retyped} of {len(deb)} cycles.")
    if "debian" in facts:
        print(f"\nDebian setup: {facts['debian']}")
    if idle_cost is not None:
        print("\n### Idle cost (cryptlockd guest, 60 s with nothing talking to either)\n")
        print(idle.table(idle_cost))  # type: ignore[arg-type]
    print(f"\nHelper RAM filesystem: {facts.get('ramfs')}.")
    print("\n### The bus (host, private dbus-daemon; bench/bus.py)\n")
    print(bus)
    for note in notes:
        print(f"\nNOTE: {note}")


def tcg_mode(accel: str) -> str:
    if accel != "tcg":
        return ""
    return f" thread={os.environ.get('CRYPTLOCKD_VM_TCG_THREAD', 'single')}"


def main() -> int:
    logging.basicConfig(level=logging.WARNING)
    n = int(os.environ.get("BENCH_CYCLES", "5"))
    # One host thread per vCPU, as a laptop's cores run at once: the guest suite's
    # round-robin TCG (tests/vm/machine.py) runs 2 vCPUs on one host core, which makes
    # every overlap (the KDFs of two devices, the reserve against logind) a sum. Multi-
    # threaded TCG is known to break trixie's wake from S3, not bookworm's (the bench's).
    suite = os.environ.get("CRYPTLOCKD_VM_SUITE", "bookworm")
    os.environ.setdefault("CRYPTLOCKD_VM_TCG_THREAD", "multi" if suite == "bookworm" else "single")
    return asyncio.run(bench(n))


if __name__ == "__main__":
    sys.exit(main())
