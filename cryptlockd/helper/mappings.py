"""The active LUKS mappings, read from sysfs: no disk I/O, so the helper may look while
the disks are busy or suspended."""

from __future__ import annotations

import os

SYS_BLOCK = "/sys/block"


def _dm_attributes(sys_block: str, attribute: str) -> dict[str, str]:
    """dm name -> the content of /sys/block/dm-*/dm/<attribute>, for every mapping that can
    be read."""
    out: dict[str, str] = {}
    try:
        entries = os.listdir(sys_block)
    except OSError:
        return out
    for entry in entries:
        if not entry.startswith("dm-"):
            continue
        try:
            with open(os.path.join(sys_block, entry, "dm", attribute)) as f:
                value = f.read().strip()
            with open(os.path.join(sys_block, entry, "dm", "name")) as f:
                name = f.read().strip()
        except OSError:
            continue
        if name:
            out[name] = value
    return out


def luks_mappings(sys_block: str = SYS_BLOCK) -> dict[str, str]:
    """dm name -> dm UUID ("CRYPT-LUKS2-<uuid>-<name>") of every LUKS mapping. The UUID
    names the header too, so a mapping reopened on another disk under the same name
    shows up as changed."""
    return {
        name: uuid
        for name, uuid in _dm_attributes(sys_block, "uuid").items()
        if uuid.startswith("CRYPT-LUKS")
    }


def suspended_mappings(sys_block: str = SYS_BLOCK) -> set[str]:
    """dm names of the mappings that device-mapper reports suspended now (any target)."""
    return {name for name, value in _dm_attributes(sys_block, "suspended").items() if value == "1"}
