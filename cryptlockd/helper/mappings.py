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


def _kname_of(sys_block: str, name: str) -> str | None:
    try:
        entries = os.listdir(sys_block)
    except OSError:
        return None
    for entry in entries:
        if entry.startswith("dm-"):
            try:
                with open(os.path.join(sys_block, entry, "dm", "name")) as f:
                    if f.read().strip() == name:
                        return entry
            except OSError:
                continue
    return None


def backing_present(name: str, sys_block: str = SYS_BLOCK) -> bool:
    """Whether every device under the mapping is still there. A disk unplugged while the
    machine slept leaves its mappings behind, over nothing: their slave links then point
    at devices sysfs no longer has. A mapping that is itself gone counts as absent."""
    top = _kname_of(sys_block, name)
    if top is None:
        return False
    queue, seen = [os.path.join(sys_block, top)], set()
    while queue:
        path = queue.pop()
        if path in seen:
            continue
        seen.add(path)
        slaves = os.path.join(path, "slaves")
        try:
            below = os.listdir(slaves)
        except OSError:
            below = []
        if not below and os.path.basename(path).startswith("dm-"):
            return False  # a mapping always sits on something: its device has gone
        for entry in below:
            link = os.path.join(slaves, entry)
            if not os.path.exists(os.path.join(link, "dev")) or _pci_gone(link):
                return False
            queue.append(os.path.realpath(link))
    return True


def _pci_gone(block: str) -> bool:
    """Whether the PCI device under a block device answers no more: a device removed while
    the machine slept, with no hotplug event to tell the kernel (a surprise removal; QEMU's
    device_del of a sleeping guest), still has its sysfs tree, but its configuration space
    reads all ones. Reading it is no disk I/O."""
    path = os.path.realpath(block)
    while path.startswith("/sys/devices/") or "/devices/" in path:
        config = os.path.join(path, "config")
        if os.path.exists(os.path.join(path, "vendor")) and os.path.exists(config):
            try:
                with open(config, "rb") as f:
                    return f.read(2) == b"\xff\xff"
            except OSError:
                return True
        parent = os.path.dirname(path)
        if parent == path:
            break
        path = parent
    return False
