"""The active LUKS mappings, read from sysfs: no disk I/O, so the helper may look while
the disks are busy or suspended."""

from __future__ import annotations

import os

SYS_BLOCK = "/sys/block"


def luks_mappings(sys_block: str = SYS_BLOCK) -> dict[str, str]:
    """dm name -> dm UUID ("CRYPT-LUKS2-<uuid>-<name>") of every LUKS mapping. The UUID
    names the header too, so a mapping reopened on another disk under the same name
    shows up as changed."""
    out: dict[str, str] = {}
    try:
        entries = os.listdir(sys_block)
    except OSError:
        return out
    for entry in entries:
        if not entry.startswith("dm-"):
            continue
        try:
            with open(os.path.join(sys_block, entry, "dm", "uuid")) as f:
                uuid = f.read().strip()
            with open(os.path.join(sys_block, entry, "dm", "name")) as f:
                name = f.read().strip()
        except OSError:
            continue
        if uuid.startswith("CRYPT-LUKS") and name:
            out[name] = uuid
    return out


def suspended_mappings(sys_block: str = SYS_BLOCK) -> set[str]:
    """dm names of the mappings that device-mapper reports suspended now (any target)."""
    out: set[str] = set()
    try:
        entries = os.listdir(sys_block)
    except OSError:
        return out
    for entry in entries:
        if not entry.startswith("dm-"):
            continue
        try:
            with open(os.path.join(sys_block, entry, "dm", "suspended")) as f:
                suspended = f.read().strip() == "1"
            with open(os.path.join(sys_block, entry, "dm", "name")) as f:
                name = f.read().strip()
        except OSError:
            continue
        if suspended and name:
            out.add(name)
    return out
