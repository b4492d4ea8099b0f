"""Repair at start (SPEC 2.7): undo what a helper that died mid-cycle left behind. It notes
both before touching them, in its RAM filesystem (helper/protocol.py names the files): the
cgroups it froze, and the sync_on_suspend value it replaced."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

from cryptlockd.daemon import helper_socket
from cryptlockd.helper import cgroups, protocol
from cryptlockd.helper.cgroups import CGROUP_ROOT
from cryptlockd.helper.power import SYNC_ON_SUSPEND

__all__ = ["repair"]

log = logging.getLogger(__name__)


def repair(
    ramfs_path: Path,
    socket_path: str,
    cgroup_root: str = CGROUP_ROOT,
    sync_file: str = SYNC_ON_SUSPEND,
) -> list[str]:
    """Thaw the cgroups a crashed cycle froze and restore sync_on_suspend, unless a helper
    still runs (its cycle is not over). Returns what was repaired."""
    if helper_socket.alive(socket_path):
        return []
    done: list[str] = []
    frozen_list = Path(protocol.on_host(protocol.FROZEN_STATE_IN_RAMFS, str(ramfs_path)))
    with contextlib.suppress(FileNotFoundError):
        frozen = [c for c in frozen_list.read_text().splitlines() if c]
        errors = cgroups.thaw(cgroup_root, frozen)
        for e in errors:
            log.error("repair: cannot thaw %s", e)
        log.warning("repair: thawed %d cgroups a crashed cycle left frozen", len(frozen))
        done.append("thawed " + " ".join(frozen))
        frozen_list.unlink()
    saved = Path(protocol.on_host(protocol.SYNC_STATE_IN_RAMFS, str(ramfs_path)))
    with contextlib.suppress(FileNotFoundError):
        value = saved.read_text().strip()
        if value and value != "0":
            Path(sync_file).write_text(value)
            log.warning("repair: restored sync_on_suspend=%s left at 0 by a crashed cycle", value)
            done.append(f"sync_on_suspend={value}")
        saved.unlink()
    return done
