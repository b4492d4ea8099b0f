"""Repair at start (SPEC 2.7): undo what a helper that died mid-cycle left behind. It notes
each before touching it, in its RAM filesystem (helper/protocol.py names the files): the
cgroups it froze, and the sync_on_suspend and rcu_expedited values it replaced. Usually
the recovery (helper/recover.py, the helper unit's ExecStopPost=) has undone them already
and left the record of that cycle, which the daemon reports (take_recovered_record)."""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

from cryptlockd.daemon import helper_socket
from cryptlockd.helper import cgroups, protocol
from cryptlockd.helper.cgroups import CGROUP_ROOT
from cryptlockd.helper.power import RCU_EXPEDITED, SYNC_ON_SUSPEND

__all__ = ["repair", "take_recovered_record"]

log = logging.getLogger(__name__)


def repair(
    ramfs_path: Path,
    socket_path: str,
    cgroup_root: str = CGROUP_ROOT,
    sync_file: str = SYNC_ON_SUSPEND,
    rcu_file: str = RCU_EXPEDITED,
) -> list[str]:
    """Thaw the cgroups a crashed cycle froze and restore sync_on_suspend and
    rcu_expedited, unless a helper still runs (its cycle is not over). Returns what was
    repaired."""
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
    for name, state, knob in (
        ("sync_on_suspend", protocol.SYNC_STATE_IN_RAMFS, sync_file),
        ("rcu_expedited", protocol.RCU_STATE_IN_RAMFS, rcu_file),
    ):
        saved = Path(protocol.on_host(state, str(ramfs_path)))
        with contextlib.suppress(FileNotFoundError):
            value = saved.read_text().strip()
            try:
                now = Path(knob).read_text().strip()
            except FileNotFoundError:
                now = value  # a kernel without it: nothing to put back
            if value and value != now:
                Path(knob).write_text(value)
                log.warning(
                    "repair: restored %s=%s left at %s by a crashed cycle", name, value, now
                )
                done.append(f"{name}={value}")
            saved.unlink()
    return done


def take_recovered_record(ramfs_path: Path) -> dict[str, Any] | None:
    """The record the recovery of a dead helper left, once: it is removed as it is read."""
    path = Path(protocol.on_host(protocol.RECOVERED_RECORD_IN_RAMFS, str(ramfs_path)))
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        text = ""
        log.error("cannot read %s: %s", path, e)
    with contextlib.suppress(FileNotFoundError):
        path.unlink()
    try:
        record = json.loads(text)
        if not isinstance(record, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        record = {"reason": f"the helper died mid-cycle; recovered (record unreadable: {e})"}
    record["success"] = False
    record["result"] = "failed"
    record["recovered"] = True
    record.setdefault("reason", "the helper died mid-cycle; recovered")
    return record
