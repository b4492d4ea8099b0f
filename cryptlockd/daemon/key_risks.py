"""The risks of this kernel and libcryptsetup for the volume keys (issue 5): informational
self-check lines, never blocking (the helper verifies every wipe, and a failed one is
reported on its own). Pure but for crypto_facts(), which reads the running system."""

from __future__ import annotations

import ctypes
import functools
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptlockd.daemon.checks import CheckResult, _exists

__all__ = ["CryptoFacts", "check_key_risks", "crypto_facts", "kernel_version"]


@dataclass(frozen=True)
class CryptoFacts:
    """What the key-wipe risks depend on: the running kernel and libcryptsetup."""

    kernel_release: str
    kernel_keyrings: bool  # /proc/keys exists (CONFIG_KEYS)
    libcryptsetup: str | None  # None: cannot be loaded
    # Symbols, since 2.6.1 has no crypt_get_version: crypt_set_keyring_to_link came in
    # 2.7 (--link-vk-to-keyring, crypttab link-volume-key=).
    keyring_to_link: bool = False
    # Devices whose crypttab line has link-volume-key=.
    linked_in_crypttab: tuple[str, ...] = ()


KEYRING_RISK_KERNEL = (6, 9)
DM_CRYPT_KEYRING_KERNEL = (4, 10)


def kernel_version(release: str) -> tuple[int, int]:
    m = re.match(r"(\d+)\.(\d+)", release)
    return (int(m.group(1)), int(m.group(2))) if m else (0, 0)


def _informational(name: str, ok: bool, detail: str) -> CheckResult:
    return CheckResult(name, ok, detail, blocking=False)


def check_key_risks(facts: CryptoFacts) -> list[CheckResult]:
    """The risks of this kernel and libcryptsetup for the volume keys, and what cryptlockd
    does about each. Informational (never blocking): the helper verifies every cycle and a
    failed verification is reported on its own. Pure."""
    kv = kernel_version(facts.kernel_release)
    kname = f"kernel {facts.kernel_release}"
    if not facts.kernel_keyrings:
        kernel = (
            f"{kname} has no key retention service (/proc/keys): the volume "
            "key lives only in the dm table, which luksSuspend wipes and "
            "cryptlockd checks"
        )
    elif kv >= KEYRING_RISK_KERNEL:
        kernel = (
            f"{kname} (6.9 or later) with LUKS2 in keyring mode: a volume key "
            "may stay in a kernel keyring after luksSuspend. cryptlockd "
            "looks for cryptsetup:<uuid>-d<N> keys after every suspend, "
            "invalidates them, checks again, and fails the cycle if one "
            "stays"
        )
    elif kv >= DM_CRYPT_KEYRING_KERNEL:
        kernel = (
            f"{kname}: LUKS2 keys go through a kernel keyring on activation; "
            "cryptsetup drops its copy, and cryptlockd checks after every "
            "suspend that no copy was left (and invalidates leftovers)"
        )
    else:
        kernel = (
            f"{kname} predates dm-crypt keyring support: the key lives only "
            "in the dm table, which luksSuspend wipes and cryptlockd checks"
        )
    out = [_informational("risk-kernel-keyring", True, kernel)]
    if facts.libcryptsetup is None:
        lib = "libcryptsetup cannot be loaded: the helper cannot suspend the devices"
    elif facts.keyring_to_link:
        lib = (
            f"libcryptsetup {facts.libcryptsetup} can link a volume key "
            "into any keyring under any name (--link-vk-to-keyring, "
            "crypttab link-volume-key=); cryptlockd only recognises "
            "cryptsetup:<uuid>-d<N>, so do not use that option"
        )
    else:
        lib = (
            f"libcryptsetup {facts.libcryptsetup}: volume keys only under "
            "cryptsetup:<uuid>-d<N>, which cryptlockd checks"
        )
    out.append(_informational("risk-libcryptsetup", facts.libcryptsetup is not None, lib))
    if facts.linked_in_crypttab:
        out.append(
            _informational(
                "risk-linked-volume-key",
                False,
                "crypttab links the volume key of "
                f"{', '.join(facts.linked_in_crypttab)} into a keyring "
                "(link-volume-key=): that copy survives luksSuspend under a "
                "name cryptlockd cannot check",
            )
        )
    return out


LIBCRYPTSETUP = "libcryptsetup.so.12"


def _crypttab_links(crypttab: Path) -> tuple[str, ...]:
    try:
        lines = crypttab.read_text().splitlines()
    except OSError:
        return ()
    names = []
    for line in lines:
        fields = line.split()
        if (
            len(fields) >= 4
            and not fields[0].startswith("#")
            and any(o.startswith("link-volume-key=") for o in fields[3].split(","))
        ):
            names.append(fields[0])
    return tuple(names)


@functools.cache
def _libcryptsetup_facts() -> tuple[str | None, bool]:
    # The version by symbol: Debian's 2.6.1 and 2.7.5 export no crypt_get_version.
    try:
        lib = ctypes.CDLL(LIBCRYPTSETUP)
    except OSError:
        return None, False
    link = hasattr(lib, "crypt_set_keyring_to_link")
    if hasattr(lib, "crypt_get_version"):
        fn = lib.crypt_get_version
        fn.restype = ctypes.c_char_p
        return str(fn().decode()), link
    if link:
        return "2.7 or later (by its symbols)", link
    return (
        "2.5 or 2.6 (by its symbols)"
        if hasattr(lib, "crypt_resume_by_token_pin")
        else "older than 2.5 (by its symbols)"
    ), link


def crypto_facts(crypttab: Path, proc_keys: Path = Path("/proc/keys")) -> CryptoFacts:
    version, link = _libcryptsetup_facts()
    return CryptoFacts(
        os.uname().release, _exists(proc_keys), version, link, _crypttab_links(crypttab)
    )
