"""Builds and caches the test bed image: a Debian guest with root on LUKS2 and a LUKS2 data disk.

Steps (see tests/vm/README.md):
1. mmdebstrap --variant=minbase a tree on the host (no loop devices, no device-mapper needed);
2. mkfs.ext4 -d the tree into a plain staging disk;
3. a provisioning boot of that tree (the guest's own kernel and initrd, init= our script)
   formats the LUKS disks, copies the tree into the root container, regenerates the initramfs
   with cryptsetup-initramfs and writes kernel + initrd + report as a tar to an output disk.
The result lives in <cache>/<suite>-<hash>/, where the hash covers every input; it is built in
a temporary folder and renamed into place, so a crash never leaves a half-built entry.

Locks: <entry>.lock is held (exclusive) while a process checks or builds the entry; the entry
directory itself is held (shared) by every process that runs guests on it, until it exits.
prune() removes an entry only when it can take both, so a run of an older checkout keeps the
entry it runs on.
"""

from __future__ import annotations

import codecs
import fcntl
import hashlib
import json
import logging
import os
import shutil
import subprocess
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path

from tests.vm import layout, machine

log = logging.getLogger(__name__)

HERE = Path(__file__).resolve().parent
GUEST_FILES = HERE / "guest_files"
DEFAULT_SUITE = "bookworm"
# The Python each suite ships; wheels for the guest are collected for it.
SUITE_PYTHON = {"bookworm": "3.11", "trixie": "3.13"}
PACKAGES = [
    "systemd",
    "systemd-sysv",
    "dbus",
    "libpam-systemd",
    "udev",
    "kmod",
    "cryptsetup",
    "cryptsetup-bin",
    "cryptsetup-initramfs",
    "initramfs-tools",
    "zstd",
    "linux-image-amd64",
    "python3",
    "python3-venv",
    "python3-systemd",
    "make",
    "kbd",
    "polkitd",
    "e2fsprogs",
    "procps",
    "keyutils",
    "util-linux",
    "mawk",
    # test_layouts.py: LUKS on a real LVM logical volume on LUKS (its udev rules,
    # lvm2-monitor and dmeventd run as on a laptop, and are frozen with the rest).
    "lvm2",
    # A session bus in a user's logind session (test_desktop.py: cryptlockd-notify).
    "dbus-user-session",
]
# trixie split systemd-cryptsetup (the crypttab generator and unit) out of systemd. The
# python3-* are the Debian package's dependencies (tests/vm/test_package.py installs it with
# apt-get in a guest without network); bookworm's pydantic (1.10) is too old for it.
# test_sync_deadline.py (bookworm only: trixie's suite is the longer one) needs a user's FUSE
# file system in writeback-cache mode and an NFS hard mount to the guest's own kernel nfsd;
# their services stay off at boot (guest_files/customize). bookworm has weston for the
# graphical session of tests/vm/test_desktop.py; nothing of it starts at boot.
# `make install` builds the C sleep entry where a compiler is at hand and installs the Python
# one where none is: bookworm's guest has gcc, trixie's has not, so the suites run each
# (tests/vm/test_installed.py checks which). trixie's package has the C one.
SUITE_PACKAGES = {
    "bookworm": [
        "gcc",
        "libc6-dev",
        "fuse3",
        "python3-pyfuse3",
        "nfs-kernel-server",
        "weston",
        # systemd-cryptenroll --tpm2-device and the TPM2 token plugin dlopen() these
        # (tests/vm/test_tpm.py); libtss2-esys pulls in the TCTI for /dev/tpmrm0.
        "libtss2-esys-3.0.2-0",
        "libtss2-mu0",
        "libtss2-rc0",
    ],
    "trixie": [
        "systemd-cryptsetup",
        "python3-dbus-fast",
        "python3-pydantic",
        "python3-pyudev",
        "python3-prometheus-client",
        # As bookworm's, under trixie's (t64) names (tests/vm/test_tpm.py).
        "libtss2-esys-3.0.2-0t64",
        "libtss2-mu-4.0.1-0t64",
        "libtss2-rc0t64",
    ],
}
ROOT_DISK_SIZE = 2 * 1024**3
DATA_DISK_SIZE = 256 * 1024**2
OUTPUT_DISK_SIZE = 256 * 1024**2
PROVISION_TIMEOUT = 900.0
MMDEBSTRAP_TIMEOUT = 1200.0


class ImageBuildError(RuntimeError):
    pass


@dataclass(frozen=True)
class TestbedImage:
    suite: str
    directory: Path
    python_version: str
    kernel_version: str
    report: dict[str, object]
    # The entry's files (see _load).
    root_disk: Path
    data_disk: Path
    kernel: Path
    initrd: Path

    @property
    def cmdline(self) -> str:
        return f"root=/dev/mapper/{layout.ROOT_DM_NAME} ro console=tty0 console=ttyS0"


def selected_suite() -> str:
    suite = os.environ.get("CRYPTLOCKD_VM_SUITE", DEFAULT_SUITE)
    if suite not in SUITE_PYTHON:
        raise ValueError(f"CRYPTLOCKD_VM_SUITE={suite!r}: expected one of {sorted(SUITE_PYTHON)}")
    return suite


def cache_root() -> Path:
    """CRYPTLOCKD_VM_CACHE, else /var/cache/cryptlockd-testbed for root, else XDG_CACHE_HOME."""
    env = os.environ.get("CRYPTLOCKD_VM_CACHE")
    if env:
        path = Path(env)
    elif os.geteuid() == 0:
        path = Path("/var/cache/cryptlockd-testbed")
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        path = Path(xdg) / "cryptlockd-testbed"
    path.mkdir(parents=True, exist_ok=True)
    return path


def inputs_hash(suite: str) -> str:
    h = hashlib.sha256()
    h.update(json.dumps({"suite": suite, "packages": _packages(suite)}).encode())
    for source in [Path(__file__), HERE / "layout.py", *sorted(GUEST_FILES.iterdir())]:
        if source.is_file():
            h.update(source.name.encode() + b"\0" + source.read_bytes())
    return h.hexdigest()[:16]


def _run(argv: list[str], timeout: float, what: str) -> subprocess.CompletedProcess[str]:
    start = time.monotonic()
    proc = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise ImageBuildError(
            f"{what} failed (exit {proc.returncode}): {' '.join(argv)}\n"
            f"{proc.stderr[-3000:]}\n{proc.stdout[-1000:]}"
        )
    log.info("%s: %.1f s", what, time.monotonic() - start)
    return proc


def _packages(suite: str) -> list[str]:
    return PACKAGES + SUITE_PACKAGES.get(suite, [])


def _bootstrap(suite: str, rootfs: Path) -> None:
    if os.geteuid() != 0:
        raise ImageBuildError("building the test bed image needs root (mmdebstrap, mkfs -d)")
    _run(
        [
            "mmdebstrap",
            "--variant=minbase",
            "--mode=root",
            f"--include={','.join(_packages(suite))}",
            "--dpkgopt=path-exclude=/usr/share/doc/*",
            "--dpkgopt=path-exclude=/usr/share/man/*",
            "--dpkgopt=path-exclude=/usr/share/locale/*",
            f'--customize-hook=sh {GUEST_FILES / "customize"} "$1" {GUEST_FILES}',
            suite,
            str(rootfs),
        ],
        MMDEBSTRAP_TIMEOUT,
        f"mmdebstrap {suite}",
    )


def _sparse(path: Path, size: int) -> None:
    with path.open("wb") as f:
        f.truncate(size)


def _tree_size(path: Path) -> int:
    out = _run(["du", "-sxb", str(path)], 120, "measuring the tree").stdout
    return int(out.split()[0])


def _provision(work: Path, rootfs: Path, accel: str) -> dict[str, object]:
    staging = work / "staging.img"
    size = int(_tree_size(rootfs) * 1.3) + 256 * 1024**2
    _run(
        [
            "mkfs.ext4",
            "-q",
            "-F",
            "-E",
            "nodiscard",
            "-L",
            "staging",
            "-d",
            str(rootfs),
            str(staging),
            str(size // 1024) + "k",
        ],
        600,
        "mkfs.ext4 -d (staging disk)",
    )
    boot = rootfs / "boot"
    kernels = sorted(boot.glob("vmlinuz-*"))
    if not kernels:
        raise ImageBuildError(f"no kernel in {boot}")
    kver = kernels[-1].name.removeprefix("vmlinuz-")
    _sparse(work / "root.img", ROOT_DISK_SIZE)
    _sparse(work / "data.img", DATA_DISK_SIZE)
    _sparse(work / "out.img", OUTPUT_DISK_SIZE)
    console = work / "provision-console.log"
    append = " ".join(
        [
            "root=/dev/vda",
            "rw",
            "console=ttyS0",
            "panic=-1",
            "loglevel=4",
            "init=/usr/local/sbin/cryptlockd-testbed-provision",
            f"testbed.passphrase_hex={layout.PASSPHRASE.encode().hex()}",
            f"testbed.argon_memory_kib={layout.ARGON2_MEMORY_KIB}",
            f"testbed.argon_iterations={layout.ARGON2_ITERATIONS}",
            f"testbed.argon_parallel={layout.ARGON2_PARALLEL}",
        ]
    )
    drives = []
    for name in ("staging.img", "root.img", "data.img", "out.img"):
        drives += ["-drive", f"file={work / name},format=raw,if=virtio,cache=unsafe"]
    argv = [
        *machine.base_args(accel),
        "-no-reboot",
        "-kernel",
        str(boot / f"vmlinuz-{kver}"),
        "-initrd",
        str(boot / f"initrd.img-{kver}"),
        "-append",
        append,
        "-serial",
        f"file:{console}",
        *drives,
    ]
    start = time.monotonic()
    try:
        subprocess.run(argv, capture_output=True, timeout=PROVISION_TIMEOUT, check=False)
    except subprocess.TimeoutExpired as e:
        raise ImageBuildError(
            f"provisioning boot hung: no power-off within {PROVISION_TIMEOUT:.0f} s; "
            f"console log {console}:\n{_tail(console)}"
        ) from e
    text = console.read_text(errors="replace") if console.exists() else ""
    if "TESTBED-PROVISION-OK" not in text:
        raise ImageBuildError(f"provisioning boot failed; console log {console}:\n{_tail(console)}")
    log.info("provisioning boot (%s): %.1f s", accel, time.monotonic() - start)
    out: dict[str, bytes] = {}
    with tarfile.open(work / "out.img", "r:") as tar:
        for member in ("report.json", "root.key"):
            src = tar.extractfile(member)
            if src is None:
                raise ImageBuildError(f"provisioning output lacks {member}")
            out[member] = src.read()
    report: dict[str, object] = json.loads(out["report.json"])
    report["kernel"] = kver
    shutil.copyfile(boot / f"vmlinuz-{kver}", work / "vmlinuz")
    crypttab = (
        f"{layout.ROOT_DM_NAME} UUID={report['root_uuid']} "
        f"/cryptroot/keyfiles/{layout.ROOT_DM_NAME}.key luks,key-slot=0\n"
    )
    with (work / "initrd.img").open("wb") as initrd:
        main = (boot / f"initrd.img-{kver}").read_bytes()
        # The kernel unpacks concatenated archives in order; this one adds what
        # cryptsetup-initramfs would have put there for a LUKS root (same paths and format).
        # It must start 4-aligned, else the kernel takes it for a compressed archive with a
        # bad magic; zero padding between archives is skipped.
        initrd.write(main + b"\0" * (-len(main) % 512))
        initrd.write(
            newc_archive(
                [
                    ("cryptroot", 0o040700, b""),
                    ("cryptroot/crypttab", 0o100600, crypttab.encode()),
                    ("cryptroot/keyfiles", 0o040700, b""),
                    (f"cryptroot/keyfiles/{layout.ROOT_DM_NAME}.key", 0o100400, out["root.key"]),
                ]
            )
        )
    report["provision_seconds"] = round(time.monotonic() - start, 1)
    for name in ("staging.img", "out.img"):
        (work / name).unlink()
    return report


def newc_archive(entries: list[tuple[str, int, bytes]]) -> bytes:
    """An uncompressed cpio archive in the kernel's initramfs format ("newc"), 512-aligned."""
    out = bytearray()

    def pad4() -> None:
        out.extend(b"\0" * (-len(out) % 4))

    for ino, (name, mode, data) in enumerate([*entries, ("TRAILER!!!", 0, b"")], start=1):
        fields = [
            ino,
            mode,
            0,
            0,
            2 if mode & 0o040000 else 1,
            0,
            len(data),
            0,
            0,
            0,
            0,
            len(name) + 1,
            0,
        ]
        out.extend(b"070701" + "".join(f"{f:08X}" for f in fields).encode())
        out.extend(name.encode() + b"\0")
        pad4()
        out.extend(data)
        pad4()
    out.extend(b"\0" * (-len(out) % 512))
    return bytes(out)


def _tail(path: Path, lines: int = 40) -> str:
    if not path.exists():
        return "(no console output)"
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def _load(directory: Path) -> TestbedImage:
    manifest = json.loads((directory / "manifest.json").read_text())
    return TestbedImage(
        suite=manifest["suite"],
        directory=directory,
        python_version=manifest["python_version"],
        kernel_version=manifest["kernel"],
        report=manifest,
        root_disk=directory / "root.img",
        data_disk=directory / "data.img",
        kernel=directory / "vmlinuz",
        initrd=directory / "initrd.img",
    )


# The entries this process runs guests on: their directories, flocked shared until it exits.
_IN_USE: list[int] = []


def _use(entry: Path) -> None:
    fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
    fcntl.flock(fd, fcntl.LOCK_SH)
    _IN_USE.append(fd)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


def _mount_points() -> list[Path]:
    # /proc/self/mountinfo's 5th field, with octal escapes (\040 for a space).
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return [Path(codecs.decode(line.split()[4], "unicode_escape")) for line in lines]


def _remove_tree(path: Path) -> bool:
    """rmtree that never descends into a mounted file system. A builder killed inside
    mmdebstrap leaves its chroot's proc, sys, dev/pts and dev/shm mounted: those are unmounted
    first (lazily: a dead builder's chroot has no users). False if that did not work."""
    path = path.resolve()
    inside = sorted((m for m in _mount_points() if m.is_relative_to(path)), reverse=True)
    if inside:
        subprocess.run(["umount", "--lazy", *map(str, inside)], capture_output=True, timeout=60)
        if any(m.is_relative_to(path) for m in _mount_points()):
            log.warning("not removing %s: file systems stay mounted below it", path)
            return False
    shutil.rmtree(path, ignore_errors=True)
    return True


def _remove_entry(root: Path, entry: str) -> bool:
    """Removes an entry and its lock file, unless a builder holds the lock file or a run
    holds the entry."""
    lock_path = root / f"{entry}.lock"
    with lock_path.open("a") as lock:
        if not _try_lock(lock.fileno()):
            return False
        path = root / entry
        if path.is_dir():
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            try:
                if not _try_lock(fd) or not _remove_tree(path):
                    return False
            finally:
                os.close(fd)
        lock_path.unlink(missing_ok=True)
    return True


def prune(root: Path, suite: str, keep: str) -> list[str]:
    """Removes what older inputs or dead builders left in the cache for `suite`: `.build-*`
    of builders that no longer run, `.failed-*`, and entries of another hash with their lock
    files, unless a builder or a run (of an older checkout) holds them. Returns the names."""
    removed = []
    for path in sorted(root.glob(f".*-{suite}-*")):
        pid = path.name.rsplit("-", 1)[-1]
        if path.name.startswith(".build-") and Path(f"/proc/{pid}").exists():
            continue
        if _remove_tree(path):
            removed.append(path.name)
    entries = {path.name.removesuffix(".lock") for path in root.glob(f"{suite}-*")}
    removed += [e for e in sorted(entries - {keep}) if _remove_entry(root, e)]
    if removed:
        log.info("pruned from the image cache: %s", ", ".join(removed))
    return removed


def ensure_image(suite: str | None = None) -> TestbedImage:
    """The cached image for `suite` (default: CRYPTLOCKD_VM_SUITE or bookworm), built if
    missing. Concurrent callers wait for one builder (a lock file per entry). The entry stays
    held (shared) until this process exits, so prune() in another checkout's run keeps it."""
    suite = suite or selected_suite()
    root = cache_root()
    name = f"{suite}-{inputs_hash(suite)}"
    final = root / name
    with (root / f"{name}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        prune(root, suite, name)
        if (final / "manifest.json").exists():
            log.info("test bed image %s (cached)", final)
        else:
            _build(root, suite, name)
        _use(final)
        return _load(final)


def _build(root: Path, suite: str, name: str) -> None:
    """Builds entry `name` (the caller holds its lock)."""
    final = root / name
    log.info("building the test bed image %s (takes a few minutes once)", final)
    start = time.monotonic()
    work = root / f".build-{name}-{os.getpid()}"
    _remove_tree(work)
    work.mkdir()
    try:
        rootfs = work / "rootfs"
        t = time.monotonic()
        _bootstrap(suite, rootfs)
        bootstrap_seconds = time.monotonic() - t
        python_version = _run(
            [
                "chroot",
                str(rootfs),
                "python3",
                "-c",
                "import sys; print('%d.%d' % sys.version_info[:2])",
            ],
            60,
            "guest python version",
        ).stdout.strip()
        kernel = sorted((rootfs / "boot").glob("vmlinuz-*"))[-1]
        accel = machine.choose_accel(kernel, root)
        report = _provision(work, rootfs, accel)
        shutil.rmtree(rootfs)
        report.update(
            {
                "suite": suite,
                "python_version": python_version,
                "accel": accel,
                "bootstrap_seconds": round(bootstrap_seconds, 1),
                "build_seconds": round(time.monotonic() - start, 1),
            }
        )
        (work / "manifest.json").write_text(json.dumps(report, indent=2) + "\n")
        os.replace(work, final)
    except BaseException:
        _remove_tree(work / "rootfs")
        failed = root / f".failed-{name}"
        _remove_tree(failed)
        if work.exists():
            work.rename(failed)
            log.error("kept the failed build's files in %s", failed)
        raise
    log.info("test bed image built in %.1f s", time.monotonic() - start)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    print(ensure_image())
