"""The coverage self-check (issue 11): which dm-crypt keys the next sleep leaves in RAM.
Kept out of checks.py for its size; the same kind of pure check, plus its reader."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from cryptlockd.daemon.checks import CheckResult
from cryptlockd.daemon.devices import LuksDevice, crypt_mappings, read_block_nodes

__all__ = ["check_coverage", "check_coverage_of"]


def check_coverage(
    mappings: Mapping[str, str],
    devices: Sequence[LuksDevice],
    excluded: Sequence[str],
    unreadable_headers: Sequence[str] = (),
) -> CheckResult:
    """Every dm-crypt mapping whose key the next sleep leaves in RAM (issue 11): excluded
    by the config, a type luksSuspend cannot wipe (plain, TCRYPT, BITLK...), a detached
    header the helper cannot read. Not blocking: the other devices are still protected.
    mappings: crypt_mappings() (dm name -> type)."""
    protected = {d.name for d in devices} - set(unreadable_headers)
    lines = []
    for name, kind in sorted(mappings.items()):
        if name in protected:
            continue
        if name in excluded:
            why = "excluded by the config"
        elif name in unreadable_headers:
            why = "its detached header (crypttab header=) cannot be read"
        elif kind.startswith("LUKS"):
            why = "not known to cryptlockd yet"
        else:
            why = f"a {kind} mapping, which luksSuspend cannot wipe"
        lines.append(f"{name} ({why})")
    if lines:
        return CheckResult(
            "coverage",
            False,
            "these keys stay in RAM through the next sleep: " + "; ".join(lines),
            blocking=False,
        )
    return CheckResult("coverage", True, "every dm-crypt key is wiped by the next sleep", False)


def _readable(path: str) -> bool:
    return os.access(path, os.R_OK)


def check_coverage_of(
    sysfs: Path, devices: Sequence[LuksDevice], excluded: Sequence[str]
) -> CheckResult:
    """check_coverage on the system: sysfs's mappings, the headers crypttab names."""
    unreadable = [d.name for d in devices if d.header and not _readable(d.header)]
    return check_coverage(crypt_mappings(read_block_nodes(sysfs)), devices, excluded, unreadable)
