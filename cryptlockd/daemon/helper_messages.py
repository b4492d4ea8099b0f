"""What the daemon puts in the arm message (the device plan, the sleep state) and how it reads
the cycle record the helper sends back. The messages themselves are helper/protocol.py's."""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptlockd.daemon import sleepconf
from cryptlockd.daemon.devices import LuksDevice, suspend_order
from cryptlockd.defs import RUNTIME_DIR

if TYPE_CHECKING:
    from cryptlockd.helper.protocol import ArmedMessage, DevicePlanEntry

__all__ = ["SLEEP_STATE_OVERRIDE", "choose_sleep_state", "device_plan", "merge_record"]

# Test hook, root-only: a sleep state to write instead of sleep.conf's (to make the write
# fail on purpose).
SLEEP_STATE_OVERRIDE = Path(RUNTIME_DIR) / "debug-sleep-state"


def choose_sleep_state(root: str = "/") -> tuple[str, str | None]:
    if SLEEP_STATE_OVERRIDE.exists():
        return SLEEP_STATE_OVERRIDE.read_text().strip(), None
    texts = []
    for path in sleepconf.config_files(root):
        with contextlib.suppress(OSError):
            texts.append(Path(path).read_text())
    state = Path(root, "sys/power/state").read_text()
    try:
        mem = Path(root, "sys/power/mem_sleep").read_text()
    except OSError:
        mem = ""
    return sleepconf.choose(texts, state, mem)


def device_plan(devices: Sequence[LuksDevice]) -> list[DevicePlanEntry]:
    """In suspend order, each with the plan's devices it needs back first. The root device
    always takes the passphrase: its keyfile, if crypttab names one, lives on the root
    itself or in the initramfs, neither of which the helper may read while root is
    suspended; so does a device whose keyfile lives on itself or behind it."""
    plan: list[DevicePlanEntry] = []
    names = {d.name for d in devices}
    for d in suspend_order(devices):
        keyfile = not d.holds_root and d.keyfile_usable and d.key_source != "passphrase"
        plan.append(
            {
                "name": d.name,
                "uuid": d.uuid,
                "key_source": d.key_source if keyfile else "passphrase",
                "keyfile_size": d.keyfile_size if keyfile else 0,
                "keyfile_offset": d.keyfile_offset if keyfile else 0,
                "essential": d.holds_root or d.essential,
                "after": [n for n in d.needs if n in names],
                "header": d.header,
                "mounts": list(d.mounts),
            }
        )
    return plan


def merge_record(
    record: dict[str, Any], daemon_steps: dict[str, float], armed: ArmedMessage | None
) -> dict[str, Any]:
    """Put the daemon's steps (PrepareForSleep, the arm, the delay lock's release) on the
    helper's timeline. `armed`:
    the helper's reply, None if it never came (a record all the same: defect 7)."""
    out = dict(record)
    helper_start = float(record.get("started_boottime", 0.0))
    start = min(helper_start, *daemon_steps.values())
    timeline = {
        k: round(v + (helper_start - start) * 1000.0, 1)
        for k, v in dict(record.get("timeline_ms", {})).items()
    }
    out["started_boottime"] = start
    for name, t in daemon_steps.items():
        timeline[name] = round((t - start) * 1000.0, 1)
    out["timeline_ms"] = dict(sorted(timeline.items(), key=lambda kv: kv[1]))
    # How long logind waited for us: PrepareForSleep(true) to the delay lock's release
    # (a Lock(), with no delay lock: the arm request to `armed`).
    held = ("prepare_for_sleep", "delay_lock_released")
    if not all(k in daemon_steps for k in held):
        held = ("arm_requested", "armed")
    if all(k in daemon_steps for k in held):
        out["arm_seconds"] = round(daemon_steps[held[1]] - daemon_steps[held[0]], 3)
    if armed is not None:
        out["kdf_reserve_kib"] = armed["reserve_kib"]
        out["vt"] = armed["vt"]
    return out
