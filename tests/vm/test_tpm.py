"""Issue 14, acceptance 1: a TPM2+PIN LUKS2 token at the resume prompt, with swtpm attached
to the guest (QEMU's TPM emulator backend, a TIS TPM).

Two boots on one pair of disks and one TPM state. The first enrolls, on root, a TPM2 token
without a PIN and one with a PIN (systemd-cryptenroll; the passphrase keyslot stays), and
powers off. The PIN went through the agent and systemd-cryptenroll in that boot, so only a
fresh QEMU (fresh RAM) can show that the cycle leaves no copy of it: the second boot runs
the cycles. There: Check() names the token without a PIN; a wrong PIN at the prompt is a
failed try (and also shows that the token without a PIN is not used: it would have opened
root with any line); the PIN resumes; a RAM dump after the resume holds no copy of the PIN;
the next cycle, the passphrase resumes.

The TPM's dictionary-attack counter takes one strike per refused PIN (the wrong PIN; the
passphrase, tried as a PIN first): two here, below swtpm's lockout threshold.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from tests.vm import image as image_mod
from tests.vm import layout
from tests.vm.conftest import TIMES, _save_failure, _test_dir
from tests.vm.guest import DiskSet, Guest
from tests.vm.install import InstalledLayer
from tests.vm.memscan import count_occurrences
from tests.vm.sleepcycle import (
    PROMPT_NOTICE,
    armed_ready,
    boottime,
    last_cycle,
    suspend,
    wake,
)
from tests.vm.swtpm import Swtpm

pytestmark = [
    pytest.mark.vm,
    pytest.mark.asyncio,
    pytest.mark.timeout(1800),
    # The token plugin, cryptenroll and the TPM2 code are systemd's: both releases.
]

# Typeable with QMP send-key on the US layout, and unlike anything else in the guest's RAM.
PIN = "Quokka-Pin-5813"
WRONG_PIN = "Wombat-Pin-2246"


def pin_needles() -> list[bytes]:
    return [PIN.encode(), PIN.encode("utf-16-le"), PIN.encode("utf-32-le")]


@contextlib.asynccontextmanager
async def tpm_boot(
    request: pytest.FixtureRequest,
    img: image_mod.TestbedImage,
    accel: str,
    disks: DiskSet,
    workdir: Path,
    tpm: Swtpm,
    name: str,
) -> AsyncIterator[Guest]:
    """A fresh boot (no saved state: it has no TPM) with the TPM attached; the artifacts of
    a failure are kept as for any guest test."""
    start = time.monotonic()
    tpm.start()
    guest = Guest(img, disks, workdir / name, accel, name=name, extra_args=tpm.qemu_args())
    ok = False
    try:
        await guest.start()
        await guest.wait_for_command(
            "systemctl is-active cryptlockd.service", 180, "cryptlockd.service active"
        )
        yield guest
        ok = True
    finally:
        TIMES.tests.append(
            (f"{request.node.nodeid} [{name}]", accel, time.monotonic() - start, guest.boot_seconds)
        )
        if not ok:
            await _save_failure(guest, workdir / name)
            print(f"---- swtpm ----\n{tpm.log_tail()}")
        await guest.close()
        tpm.stop()


async def enroll(g: Guest) -> dict[str, object]:
    await g.wait_for_command("test -c /dev/tpmrm0", 60, "the guest's TPM (/dev/tpmrm0)")
    root = layout.ROOT_DISK
    env = {"PASSWORD": layout.PASSPHRASE}
    # Without a PIN first (token 0), then with one (token 1); the passphrase slot stays.
    await g.run(["systemd-cryptenroll", "--tpm2-device=auto", root], env=env, timeout=300)
    await g.run(
        ["systemd-cryptenroll", "--tpm2-device=auto", "--tpm2-with-pin=yes", root],
        env={**env, "NEWPIN": PIN},
        timeout=300,
    )
    dump = await g.run(["cryptsetup", "luksDump", "--dump-json-metadata", root])
    meta: dict[str, object] = dump.json()
    return meta


async def test_tpm2_pin_token_resumes_and_a_token_without_pin_is_never_used(
    request: pytest.FixtureRequest,
    vm_image: image_mod.TestbedImage,
    vm_accel: str,
    vm_installed: InstalledLayer,
) -> None:
    missing = Swtpm.missing()
    if missing:
        pytest.fail(missing)
    if not vm_installed.ok:
        pytest.fail("installing the project in the guest failed:\n" + vm_installed.log[-6000:])
    workdir = _test_dir(request, vm_image.suite)
    disks = vm_installed.disks.overlay(workdir / "disks")
    tpm = Swtpm(workdir / "swtpm")
    try:
        # Boot 1: enroll, power off.
        async with tpm_boot(request, vm_image, vm_accel, disks, workdir, tpm, "enroll") as g:
            meta = await enroll(g)
            tokens = meta["tokens"]
            assert isinstance(tokens, dict)
            kinds = {k: (t["type"], t.get("tpm2-pin", False)) for k, t in tokens.items()}
            assert kinds == {"0": ("systemd-tpm2", False), "1": ("systemd-tpm2", True)}, kinds
            await g.poweroff()

        # Boot 2: fresh RAM, the same disks and TPM.
        async with tpm_boot(request, vm_image, vm_accel, disks, workdir, tpm, "resume") as g:
            await armed_ready(g)
            closure = (await g.run("cat /run/cryptlockd/ramfs/manifest.json")).json()
            libs = closure["closure"]["library_paths"]
            assert any(p.endswith("libcryptsetup-token-systemd-tpm2.so") for p in libs), libs
            assert any("libtss2-tcti-device.so" in p for p in libs), libs
            assert closure["self_test"]["tpm2_token"] == "ok", closure["self_test"]

            check = json.loads((await g.run("cryptlockctl check --json", check=False)).stdout)
            lines = {r["name"]: r for r in check}
            no_pin = lines["tpm2-token-without-pin"]
            assert not no_pin["ok"] and "root (token 0)" in no_pin["detail"], no_pin
            assert "root (token 1)" in lines["tpm2-pin-token"]["detail"], lines
            print(f"\nCheck(): {no_pin['detail']}")

            # Cycle 1: a wrong PIN (a failed try: neither token opens root with it), then
            # the PIN.
            since = await boottime(g)
            notices = g.console_count(PROMPT_NOTICE)
            await suspend(g, "systemctl suspend", 120)
            await wake(g, [WRONG_PIN, PIN], notices=notices)
            rec = await last_cycle(g, since)
            assert rec["success"] is True, rec
            assert rec["wrong_passphrases"] == 1, rec
            assert f"token:{layout.ROOT_DM_NAME}" in rec["timeline_ms"], rec["timeline_ms"]
            assert not [p for p in rec["problems"] if "TPM2" in p], rec["problems"]
            t = rec["timeline_ms"]
            print(
                "PIN cycle: the wrong line refused (as PIN, then as passphrase) and the "
                f"back-off: {t['prompt#2'] - t['passphrase_entered']:.0f} ms; the PIN "
                f"opened root in {t['token:root'] - t['passphrase_entered#2']:.0f} ms"
            )

            dump = await g.dump_memory("after-pin-resume")
            try:
                found = count_occurrences(dump, pin_needles())
            finally:
                dump.unlink()
            print(f"PIN copies in RAM after the resume: {found}")
            assert all(n == 0 for n in found.values()), found

            # Cycle 2: the passphrase still opens root (the TPM refused it as a PIN first).
            since = await boottime(g)
            notices = g.console_count(PROMPT_NOTICE)
            await suspend(g, "systemctl suspend", 120)
            await wake(g, [layout.PASSPHRASE], notices=notices)
            rec = await last_cycle(g, since)
            assert rec["success"] is True and rec["wrong_passphrases"] == 0, rec
            assert f"token:{layout.ROOT_DM_NAME}" not in rec["timeline_ms"], rec["timeline_ms"]
            await g.run("test -w /", check=True)
    finally:
        tpm.close()
    shutil.rmtree(workdir / "disks", ignore_errors=True)
    if os.environ.get("CRYPTLOCKD_VM_KEEP") != "1":
        shutil.rmtree(workdir, ignore_errors=True)
