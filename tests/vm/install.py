"""Installs the project in the test guest through its own `make install`, offline.

The host collects wheels for the guest's Python (pip download --only-binary for the guest's
version and platform) and packs them with the source tree into a tar, attached to the guest as
a read-only raw disk (/dev/vdc). The guest unpacks it and runs
`PIP_NO_INDEX=1 PIP_FIND_LINKS=... make install`, then enables the service as README says.
The result is an "installed layer": qcow2 overlays on the base image, powered off cleanly, that
each test boots a copy-on-write copy of.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import tarfile
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path

from tests.vm.guest import DiskSet, Guest
from tests.vm.image import TestbedImage, cache_root

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[2]
GUEST_SRC = "/root/cryptlockd-src"
# Provided by Debian's python3-systemd in the guest (the venv sees system site-packages);
# on PyPI it is an sdist only and would need a compiler and libsystemd-dev in the guest.
FROM_DEBIAN = {"systemd-python"}
PLATFORMS = [
    "manylinux2014_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux_2_28_x86_64",
    "manylinux_2_34_x86_64",
    "linux_x86_64",
]
INSTALL_TIMEOUT = 900.0


@dataclass(frozen=True)
class InstalledLayer:
    disks: DiskSet
    ok: bool
    log: str
    seconds: float


def guest_requirements() -> list[str]:
    meta = tomllib.loads((REPO / "pyproject.toml").read_text())
    deps = [
        d
        for d in meta["project"].get("dependencies", [])
        if re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0].lower() not in FROM_DEBIAN
    ]
    # pip builds the project in the guest with no index: its build backend comes from here.
    return deps + list(meta["build-system"]["requires"])


def wheelhouse(python_version: str) -> Path:
    """Wheels for the guest, cached per Python version and requirement list. The suites
    have different Pythons, so they never share one; runs that need the same one wait for
    its lock, and the wheels are downloaded into a private directory renamed into place."""
    reqs = guest_requirements()
    key = hashlib.sha256(json.dumps([python_version, reqs, PLATFORMS]).encode()).hexdigest()[:12]
    root = cache_root()
    final = root / f"wheels-py{python_version}-{key}"
    with (root / f"wheels-{key}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if final.is_dir():
            return final
        for stale in root.glob(f".wheels-{key}-*"):  # what killed downloads left
            shutil.rmtree(stale, ignore_errors=True)
        work = root / f".wheels-{key}-{os.getpid()}"
        start = time.monotonic()
        argv = [
            "/usr/bin/python3",
            "-m",
            "pip",
            "download",
            "-q",
            "--disable-pip-version-check",
            "--only-binary=:all:",
            "--implementation",
            "cp",
            "--python-version",
            python_version,
            *(f"--platform={p}" for p in PLATFORMS),
            "--dest",
            str(work),
            *reqs,
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=600)
        if proc.returncode != 0:
            shutil.rmtree(work, ignore_errors=True)
            raise RuntimeError(f"collecting wheels failed: {' '.join(argv)}\n{proc.stderr}")
        os.replace(work, final)
        log.info("wheelhouse for Python %s: %.1f s", python_version, time.monotonic() - start)
        return final


def source_files() -> list[str]:
    """The checkout's files as git sees them (tracked plus untracked-not-ignored)."""
    try:
        proc = subprocess.run(
            [
                "git",
                "-C",
                str(REPO),
                "ls-files",
                "-z",
                "--cached",
                "--others",
                "--exclude-standard",
            ],
            capture_output=True,
            check=True,
            timeout=60,
        )
        names = [n for n in proc.stdout.decode().split("\0") if n]
    except (OSError, subprocess.CalledProcessError):
        skip = {
            ".git",
            ".venv",
            "artifacts",
            "__pycache__",
            ".mypy_cache",
            ".ruff_cache",
            ".pytest_cache",
            "build",
            "dist",
        }
        names = [
            str(p.relative_to(REPO))
            for p in REPO.rglob("*")
            if p.is_file() and not skip.intersection(p.relative_to(REPO).parts)
        ]
    return sorted(n for n in names if (REPO / n).is_file() or (REPO / n).is_symlink())


def make_payload(python_version: str, dest: Path) -> Path:
    """A tar with src/ (the checkout) and wheels/; attached raw, read by `tar -x` in the guest."""
    wheels = wheelhouse(python_version)
    with tarfile.open(dest, "w", format=tarfile.GNU_FORMAT) as tar:
        for name in source_files():
            tar.add(REPO / name, arcname=f"src/{name}", recursive=False)
        for wheel in sorted(wheels.iterdir()):
            tar.add(wheel, arcname=f"wheels/{wheel.name}")
        info = tarfile.TarInfo("wheels/.complete")
        tar.addfile(info, io.BytesIO(b""))
    return dest


INSTALL_SCRIPT = f"""
set -eux
rm -rf {GUEST_SRC} && mkdir -p {GUEST_SRC}
tar -xf /dev/vdc -C {GUEST_SRC}
cd {GUEST_SRC}/src
PIP_NO_INDEX=1 PIP_FIND_LINKS={GUEST_SRC}/wheels PIP_DISABLE_PIP_VERSION_CHECK=1 make install
systemctl daemon-reload
systemctl enable --now cryptlockd.service
systemctl is-active cryptlockd.service
"""


async def build_installed_layer(image: TestbedImage, accel: str, workdir: Path) -> InstalledLayer:
    """Boots the base image once, installs the project, powers off. Never raises for a failed
    install: the layer records it, and the tests that need the project report the log."""
    start = time.monotonic()
    workdir.mkdir(parents=True, exist_ok=True)
    payload = make_payload(image.python_version, workdir / "payload.tar")
    disks = DiskSet.of_image(image).overlay(workdir / "disks")
    guest = Guest(image, disks, workdir / "boot", accel, extra_drives=[payload], name="install")
    try:
        await guest.start()
        result = await guest.run(INSTALL_SCRIPT, timeout=INSTALL_TIMEOUT, check=False)
        text = (
            f"$ make install (exit {result.rc}, {result.seconds:.1f} s)\n"
            f"{result.stdout}\n{result.stderr}"
        )
        if result.rc != 0:
            text += "\n--- journal ---\n" + await guest.journal()
        # A clean power-off, so the layer's file systems are consistent for every copy.
        await guest.poweroff()
    finally:
        await guest.close()
    payload.unlink()
    (workdir / "install.log").write_text(text)
    return InstalledLayer(disks, result.rc == 0, text, time.monotonic() - start)
