"""Debian's cryptsetup-suspend in the bench guest: its package fetched on the host, installed
in a guest without network, and the one thing a test bed lacks for it set up.

How cryptsetup-suspend works (bookworm, 2:2.6.1): a drop-in replaces systemd-suspend.service's
ExecStart with `openvt -ws -c8 cryptsetup-suspend-wrapper`. The wrapper unpacks
/boot/initrd.img-$(uname -r) into a ramfs (and refuses when MemAvailable + SwapFree is under
300 MiB), runs the system-sleep `pre` hooks, collects the mapped LUKS devices of
/etc/crypttab, freezes every cgroup but its own, chroots into the unpacked initramfs and runs
`cryptsetup-suspend --reverse <devices>` (luksSuspend each, then writes `mem`). After wake it
resumes, still in the chroot, the devices listed in the initramfs's cryptroot/crypttab
(askpass prompt on VT 8), then the others from the root (keyfiles), thaws and runs the `post`
hooks.

The test bed boots with an initrd built on the host; the guest's /etc/crypttab opens root
with the boot keyfile (keyslot 0), so an initramfs rebuilt from it resumes root from that
keyfile, without a prompt. For a passphrase at resume, as on a Debian install with root on
LUKS, root's entry is replaced by one with a passphrase prompt (`none`) and the initramfs is
rebuilt with update-initramfs (the wrapper resumes root from the chroot; from the root it
would read the suspended root: a dead lock). The boot itself keeps using the host's initrd.
"""

from __future__ import annotations

import subprocess
import tempfile
from pathlib import Path

from tests.vm import layout
from tests.vm.guest import Guest

PACKAGE = "cryptsetup-suspend"
VT = 8  # the wrapper's VT (openvt -c8)


def download(suite: str, version: str, missing: list[str], into: Path) -> list[Path]:
    """Downloads PACKAGE at `version` (the guest's cryptsetup) and the packages `missing` in
    the guest from deb.debian.org with a private apt state for `suite`; returns the .debs."""
    state = Path(tempfile.mkdtemp(prefix="bench-apt-"))
    (state / "lists" / "partial").mkdir(parents=True)
    (state / "archives" / "partial").mkdir(parents=True)
    sources = state / "sources.list"
    sources.write_text(
        f"deb http://deb.debian.org/debian {suite} main\n"
        f"deb http://deb.debian.org/debian {suite}-updates main\n"
        f"deb http://deb.debian.org/debian-security {suite}-security main\n"
    )
    opts = [
        f"-oDir::Etc::SourceList={sources}",
        "-oDir::Etc::SourceParts=/nonexistent",
        f"-oDir::State::Lists={state / 'lists'}",
        f"-oDir::Cache={state}",
        "-oAPT::Sandbox::User=root",
        "-oDebug::NoLocking=1",
        "-q",
    ]
    subprocess.run(["apt-get", *opts, "update"], check=True, capture_output=True)
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["apt-get", *opts, "download", f"{PACKAGE}={version}", *missing],
        check=True,
        capture_output=True,
        cwd=into,
    )
    return sorted(into.glob("*.deb"))


def depends(deb: Path) -> list[str]:
    """The package names of a .deb's Depends (alternatives and versions dropped)."""
    field = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Depends"], check=True, capture_output=True, text=True
    ).stdout
    return [dep.split("|")[0].split("(")[0].strip() for dep in field.split(",") if dep.strip()]


async def install(guest: Guest, suite: str, workdir: Path) -> str:
    """Installs cryptsetup-suspend in the guest and prepares root for it; returns a report
    (versions, the initramfs's crypttab) for the bench's notes."""
    version = (await guest.run("dpkg-query -W -f='${Version}' cryptsetup-initramfs")).stdout.strip()
    debs = download(suite, version, [], workdir / "debs")
    missing = []
    for dep in depends(debs[0]):
        rc = (await guest.run(f"dpkg-query -W {dep}", check=False)).rc
        if rc != 0:
            missing.append(dep)
    if missing:
        debs = download(suite, version, missing, workdir / "debs")
    await guest.run("mkdir -p /root/debs")
    for deb in debs:
        await guest.write_file(f"/root/debs/{deb.name}", deb.read_bytes())
    installed = await guest.run("dpkg -i /root/debs/*.deb 2>&1", timeout=300)
    uuid = (await guest.run(f"blkid -s UUID -o value {layout.ROOT_DISK}")).stdout.strip()
    # The image's crypttab opens root with the boot keyfile (keyslot 0); with that entry the
    # wrapper resumes root from the keyfile in its unpacked initramfs and never asks.
    await guest.run(
        f"sed -i '/^{layout.ROOT_DM_NAME} /d' /etc/crypttab && "
        f"echo '{layout.ROOT_DM_NAME} UUID={uuid} none luks' >> /etc/crypttab"
    )
    rebuilt = await guest.run("update-initramfs -u -k $(uname -r) 2>&1 | tail -3", timeout=900)
    crypttab = await guest.run(
        "d=$(mktemp -d) && unmkinitramfs /boot/initrd.img-$(uname -r) $d && "
        "cat $d/main/cryptroot/crypttab $d/cryptroot/crypttab 2>/dev/null; rm -rf $d",
        timeout=300,
        check=False,
    )
    mem = await guest.run("grep -E 'MemAvailable|SwapFree' /proc/meminfo")
    return (
        f"{PACKAGE} {version} ({', '.join(d.name for d in debs)}); dpkg: "
        f"{installed.stdout.strip().splitlines()[-1:]}; update-initramfs: "
        f"{rebuilt.stdout.strip()!r}; the initramfs's cryptroot/crypttab: "
        f"{crypttab.stdout.strip()!r}; {' '.join(mem.stdout.split())}"
    )


async def clear_vt(guest: Guest) -> None:
    """Resets VT 8, so that the prompt is the only thing on it after wake."""
    await guest.run(f"printf '\\033c' > /dev/tty{VT}", check=False)
