"""`make demo`: boots a Debian guest with root on LUKS, installs cryptlockd in it with its own
`make install`, and shows what cryptlockd does. Run as `.venv/bin/python -m tests.vm.demo`.

The sleep cycle part (close the lid, wake, type the passphrase, print the timeline) lives in
tests/vm/demo_cycle.py: `async def show(guest: Guest, say: Callable[[str], None]) -> None`.
When that module exists, the demo runs it after the tour below.
"""

from __future__ import annotations

import asyncio
import importlib
import logging
import shutil
import sys
import textwrap
import time
from pathlib import Path

from tests.vm import image as image_mod
from tests.vm import layout, machine
from tests.vm.guest import Guest, GuestError, artifacts_dir
from tests.vm.install import build_installed_layer

START = time.monotonic()


def say(text: str = "") -> None:
    print(textwrap.fill(text, 96) if text else "", flush=True)


def heading(text: str) -> None:
    print(f"\n== {text} " + "=" * max(0, 90 - len(text)), flush=True)


def show_output(text: str) -> None:
    for line in text.rstrip("\n").splitlines():
        print(f"    {line}", flush=True)


FAILED: list[str] = []


async def show(guest: Guest, command: str, *, expect_ok: bool = True) -> str:
    """Runs a command in the guest and shows it like a terminal would. A command that should
    succeed but fails is shown too, and makes the demo exit non-zero at the end."""
    print(f"  guest# {command}", flush=True)
    result = await guest.run(command, check=False, timeout=60)
    show_output(result.stdout + result.stderr)
    if result.rc != 0:
        print(f"    (exit status {result.rc})", flush=True)
        if expect_ok:
            FAILED.append(command)
    return result.stdout


async def tour(guest: Guest) -> None:
    heading("1. The guest's root file system is encrypted")
    say(
        "The guest has two virtual disks. vda is a LUKS2 container that holds the root file "
        "system; the guest's initramfs unlocked it at boot. vdb is a second LUKS2 disk, "
        "opened from /etc/crypttab with a keyfile that lives on the (encrypted) root, and "
        "mounted on /data. While the machine runs, the kernel holds both volume keys in RAM: "
        "that is what cryptlockd protects across suspend."
    )
    await show(guest, "lsblk -o NAME,TYPE,FSTYPE,SIZE,MOUNTPOINT /dev/vda /dev/vdb")
    await show(guest, "findmnt -o TARGET,SOURCE,FSTYPE /; findmnt -n -o TARGET,SOURCE,FSTYPE /data")

    heading("2. cryptlockd runs as a system service")
    say(
        "It was installed inside the guest by the project's own `make install` (offline, from "
        "a wheelhouse the host collected) and enabled with `systemctl enable --now`."
    )
    await show(guest, "systemctl --no-pager --lines=0 status cryptlockd.service")

    heading("3. It knows which LUKS devices to protect")
    say(
        "`cryptlockctl` asks the daemon over D-Bus. The root device is flagged, because "
        "suspending it means nothing may touch the disk until the passphrase is back."
    )
    await show(guest, "cryptlockctl devices")

    heading("4. It holds a delay lock in logind")
    say(
        "Before any suspend, logind asks every holder of a 'delay' inhibitor to get ready. "
        "cryptlockd uses that moment to arm its helper (which will wipe the keys) and then "
        "releases the lock."
    )
    await show(guest, "systemd-inhibit --list --no-pager")

    heading("5. `cryptlockctl check`: is this machine protected?")
    say(
        "The administrator's question. Each line is one self-check; exit status 0 means "
        "the next suspend will wipe the keys."
    )
    # Exit status 1 here is an answer ("not protected, because ..."), not a demo failure.
    await show(guest, "cryptlockctl check", expect_ok=False)
    await show(guest, "cryptlockctl status")


async def sleep_cycle(guest: Guest) -> None:
    """The hook for the protected sleep cycle (tests/vm/demo_cycle.py)."""
    heading("6. A protected sleep cycle")
    if not (Path(__file__).with_name("demo_cycle.py")).exists():
        say(
            "(The lid-close demo - wipe the keys, sleep, wake, type the passphrase, print "
            "the timeline - appears here once tests/vm/demo_cycle.py exists.)"
        )
        return
    module = importlib.import_module("tests.vm.demo_cycle")
    await module.show(guest, say)


async def main() -> int:
    logging.basicConfig(level=logging.INFO, format="  [testbed] %(message)s")
    logging.getLogger("qemu").setLevel(logging.WARNING)  # its connection chatter means nothing here
    heading("cryptlockd demo")
    say(
        "cryptlockd wipes the LUKS disk-encryption keys from RAM while a Linux machine is "
        "suspended, and asks for the passphrase on wake. This machine's kernel cannot run "
        "device-mapper, so the demo runs everything in a QEMU guest: a Debian system with its "
        "root file system on LUKS, just like an encrypted laptop."
    )
    say()
    say(
        "Preparing the guest image (built once with mmdebstrap and cached; a few minutes the "
        "first time)."
    )
    img = image_mod.ensure_image()
    accel = machine.choose_accel(img.kernel, image_mod.cache_root())
    say(
        f"Guest: Debian {img.suite}, kernel {img.kernel_version}, {layout.GUEST_MEMORY_MIB} MiB "
        f"RAM, accelerator {accel.upper()}"
        + (" (software emulation: slower, but needs no KVM)" if accel == "tcg" else "")
        + "."
    )
    workdir = artifacts_dir(img.suite) / "demo"
    shutil.rmtree(workdir, ignore_errors=True)
    say("Booting the guest and installing cryptlockd in it with `make install` ...")
    layer = await build_installed_layer(img, accel, workdir / "installed")
    if not layer.ok:
        say(f"make install failed in the guest; log: {workdir / 'installed' / 'install.log'}")
        show_output(layer.log[-4000:])
        return 1
    say(f"Installed in {layer.seconds:.0f} s. Booting a fresh copy of the installed guest ...")
    guest = Guest(
        img, layer.disks.overlay(workdir / "disks"), workdir / "guest", accel, name="demo"
    )
    try:
        await guest.start()
        say(f"Booted in {guest.boot_seconds:.0f} s.")
        await guest.wait_for_command(
            "systemctl is-active cryptlockd.service", 60, "cryptlockd.service active"
        )
        say(
            "Waiting (up to 4 minutes) until cryptlockd reports the machine protected: at start "
            "it builds the RAM filesystem its helper runs from ..."
        )
        try:
            await guest.wait_for_command(
                "busctl get-property org.cryptlockd1 /org/cryptlockd1 org.cryptlockd1.Manager "
                "Protected | grep -q true",
                240,
                "Protected",
                interval=2.0,
            )
        except GuestError:
            say("It does not (yet); `cryptlockctl check` below says why.")
        await tour(guest)
        await sleep_cycle(guest)
    except GuestError as e:
        say(f"The demo failed: {e}")
        say(f"Console log: {guest.console_log}")
        return 1
    finally:
        await guest.close()
        for disks in (workdir / "disks", workdir / "installed" / "disks"):
            shutil.rmtree(disks, ignore_errors=True)
    if FAILED:
        say(f"These steps failed: {', '.join(FAILED)}. Console log: {guest.console_log}")
        return 1
    heading("Done")
    say(
        f"The demo took {time.monotonic() - START:.0f} s. The guest's console log is in "
        f"{guest.console_log}. `make test` runs the whole suite, this guest included."
    )
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
