"""The QEMU machine every test guest runs on, and the choice between KVM and TCG."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import tempfile
import time
from pathlib import Path

from tests.vm import layout
from tests.wait import GiveUp, wait_until

log = logging.getLogger(__name__)

QEMU = "qemu-system-x86_64"
# A kernel without a root device panics; with KVM that happens in a second or two. Nested KVM
# on this kind of host hangs the guest instead, so no progress within this deadline means TCG.
KVM_PROBE_DEADLINE = 15.0
KVM_PROBE_MARK = b"Kernel panic"


def kernel_args(accel: str) -> list[str]:
    """What the guest kernel's command line gets for this accelerator. Under TCG the
    kernel finds the vCPUs' TSCs unsynchronized (its warp check times the emulation, but
    every vCPU reads the one host TSC) and falls back to the HPET: each clock read, which
    systemd, journald and Python make all the time, is then an emulated MMIO access under
    QEMU's global lock. Probed in the bookworm guest (issue 12): 100 000 time.monotonic()
    took 0.22 s on the HPET, 0.13 s on the TSC; request -> SUSPEND, median of 6, went from
    1.09 to 0.89 s with cryptlockd, 0.65 to 0.59 s for the stock sleep. A laptop reads its
    TSC; so does the guest now. KVM brings kvm-clock."""
    return [] if accel == "kvm" else ["tsc=reliable"]


def base_args(accel: str) -> list[str]:
    """Arguments shared by every boot: the pc machine (q35 only sleeps once), S3 enabled,
    the bochs VGA (its DRM framebuffer console survives S3; QEMU resets plain VGA on wake)."""
    if accel == "kvm":
        accel_args = ["-accel", "kvm", "-cpu", "host"]
    else:
        # thread=single: with one host thread per vCPU (MTTCG, QEMU 7.2), the trixie guest
        # (kernel 6.12) woke from S3 with corrupted RFLAGS (reserved bits and TF set: a #DB
        # in syscore_resume or CPU1's bring-up, then an oops) in 7 of 10 protected cycles,
        # with max, max,pku=off or max,la57=off. Round-robin TCG woke 6 of 6 (so did -smp 1).
        # CRYPTLOCKD_VM_TCG_THREAD=multi: one host thread per vCPU where that is known to
        # wake (bench/cycle.py, bookworm), so the guest's 2 vCPUs are 2 CPUs, as on a laptop.
        thread = os.environ.get("CRYPTLOCKD_VM_TCG_THREAD", "single")
        if thread not in ("single", "multi"):
            raise ValueError(f"CRYPTLOCKD_VM_TCG_THREAD={thread!r}: single or multi")
        accel_args = ["-accel", f"tcg,tb-size=256,thread={thread}", "-cpu", "max"]
    return [
        # QEMU dies with the test run that started it, however that run ends (killed by
        # a CI cancel, or by `make` on Ctrl-C): no orphaned guest keeps a core busy.
        "setpriv",
        "--pdeathsig",
        "KILL",
        QEMU,
        "-machine",
        "pc",
        "-global",
        "PIIX4_PM.disable_s3=0",
        *accel_args,
        "-m",
        str(layout.GUEST_MEMORY_MIB),
        "-smp",
        str(layout.GUEST_CPUS),
        "-vga",
        "std",
        "-display",
        "none",
        "-nodefaults",
        "-no-user-config",
        "-nic",
        "none",
    ]


def kvm_works(kernel: Path) -> bool:
    if not os.access("/dev/kvm", os.R_OK | os.W_OK):
        return False
    with tempfile.TemporaryDirectory(prefix="cryptlockd-kvm-probe-") as tmp:
        console = Path(tmp) / "console.log"
        argv = [
            *base_args("kvm"),
            "-no-reboot",
            "-kernel",
            str(kernel),
            "-append",
            "console=ttyS0 panic=-1",
            "-serial",
            f"file:{console}",
        ]
        proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

        def panicked() -> bool:
            exited = proc.poll() is not None  # read before the console: no mark lost
            if console.exists() and KVM_PROBE_MARK in console.read_bytes():
                return True
            if exited:
                raise GiveUp("QEMU exited before the kernel got that far")
            return False

        try:
            return wait_until(panicked, KVM_PROBE_DEADLINE, 0.2, "the probe kernel runs")
        except (GiveUp, AssertionError):
            return False
        finally:
            proc.kill()
            proc.wait()


def _probe_cache_key() -> str:
    boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    qemu = subprocess.run([QEMU, "--version"], capture_output=True, text=True).stdout
    return hashlib.sha256(f"{boot_id}\n{qemu}".encode()).hexdigest()[:16]


def choose_accel(kernel: Path, cache_dir: Path) -> str:
    """KVM if it truly boots a kernel here, else TCG. CRYPTLOCKD_VM_ACCEL=kvm|tcg overrides.
    The probe result is kept for the host's current boot (a host's KVM does not change
    between two test runs of one boot), so `make demo` and `make test` probe once."""
    forced = os.environ.get("CRYPTLOCKD_VM_ACCEL")
    if forced:
        if forced not in ("kvm", "tcg"):
            raise ValueError(f"CRYPTLOCKD_VM_ACCEL={forced!r}: expected kvm or tcg")
        log.info("accelerator %s (forced by CRYPTLOCKD_VM_ACCEL)", forced)
        return forced
    record = cache_dir / "accel.json"
    key = _probe_cache_key()
    try:
        cached = json.loads(record.read_text())
        if cached.get("key") == key:
            log.info("accelerator %s (probed earlier in this host boot)", cached["accel"])
            return str(cached["accel"])
    except (OSError, ValueError):
        pass
    start = time.monotonic()
    accel = "kvm" if kvm_works(kernel) else "tcg"
    log.info(
        "accelerator %s (KVM probe: %s in %.1f s)",
        accel,
        "kernel booted" if accel == "kvm" else "no kernel progress, falling back to TCG",
        time.monotonic() - start,
    )
    tmp = record.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps({"key": key, "accel": accel}))
    tmp.replace(record)
    return accel
