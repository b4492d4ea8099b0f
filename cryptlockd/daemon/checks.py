"""Self-checks behind Check(), Protected and Problems.

Each check is a pure function of its inputs (paths and facts passed in), so unit tests
reach them with a fake tree. None of them changes anything.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.searchpath import UNIT_PATH, first_file

# systemd's system unit search path, most specific first (systemd.unit(5)).
SLEEP_DROPIN = "systemd-suspend.service.d/cryptlockd.conf"


def _exists(path: Path, *, regular_file: bool = False) -> bool:
    # Path.exists()/is_file() raise on EACCES; for a check that is just "not there".
    try:
        return path.is_file() if regular_file else path.exists()
    except OSError:
        return False


@dataclass(frozen=True)
class CheckResult:
    name: str
    ok: bool
    detail: str
    # A failed blocking check means the next suspend will not wipe the keys.
    blocking: bool = True

    def as_dbus(self) -> list[object]:
        return [self.name, self.ok, self.detail]


def check_cgroup2(cgroup_root: Path) -> CheckResult:
    # The helper freezes cgroups with cgroup.freeze, which only the unified hierarchy has.
    if _exists(cgroup_root / "cgroup.controllers"):
        return CheckResult("cgroup-v2", True, f"unified cgroup hierarchy at {cgroup_root}")
    return CheckResult(
        "cgroup-v2", False, f"no cgroup v2 hierarchy at {cgroup_root}: cannot freeze tasks"
    )


def check_sync_on_suspend(sysfs: Path) -> CheckResult:
    # Without the knob the kernel syncs in suspend and hangs on the suspended disk.
    path = sysfs / "power" / "sync_on_suspend"
    if _exists(path):
        return CheckResult("sync-on-suspend", True, f"{path} present")
    return CheckResult(
        "sync-on-suspend",
        False,
        f"{path} missing (kernel older than 5.6?): suspend would hang in sync",
    )


def check_suspend_to_ram(sysfs: Path) -> CheckResult:
    path = sysfs / "power" / "state"
    try:
        states = path.read_text().split()
    except OSError as e:
        return CheckResult("suspend-to-ram", False, f"cannot read {path}: {e.strerror}")
    if "mem" in states:
        return CheckResult("suspend-to-ram", True, f"{path}: {' '.join(states)}")
    return CheckResult(
        "suspend-to-ram", False, f"the kernel offers no suspend-to-RAM ({path}: {' '.join(states)})"
    )


def check_logind(owner: str | None, inhibitor_held: bool, sleeping: bool) -> CheckResult:
    if owner is None:
        return CheckResult("logind", False, "logind (org.freedesktop.login1) is not on the bus")
    if sleeping:
        return CheckResult(
            "logind", True, f"logind at {owner}; inhibitor released for the sleep in progress"
        )
    if not inhibitor_held:
        return CheckResult(
            "logind",
            False,
            f"logind at {owner}, but we hold no delay inhibitor: a suspend would not wait for us",
        )
    return CheckResult("logind", True, f"logind at {owner}; delay inhibitor held")


def check_inhibit_delay(delay_max_usec: int | None, arm_timeout_sec: float) -> CheckResult:
    # logind stops waiting for delay locks after InhibitDelayMaxSec; arming that takes
    # longer loses the race and the machine sleeps unprotected. Not blocking: arming
    # usually takes well under a second.
    if delay_max_usec is None:
        return CheckResult(
            "inhibit-delay", True, "logind's InhibitDelayMaxSec unknown", blocking=False
        )
    delay = delay_max_usec / 1e6
    if delay >= arm_timeout_sec:
        return CheckResult(
            "inhibit-delay",
            True,
            f"logind waits up to {delay:g} s; arming may take {arm_timeout_sec:g} s",
            blocking=False,
        )
    return CheckResult(
        "inhibit-delay",
        False,
        f"logind's InhibitDelayMaxSec={delay:g}s is shorter than "
        f"cycle.arm_timeout_sec={arm_timeout_sec:g}: a slow arm would lose "
        "the race and the machine would sleep unprotected",
        blocking=False,
    )


def check_devices(devices: Sequence[LuksDevice], excluded: Sequence[str] = ()) -> CheckResult:
    if devices:
        names = ", ".join(d.name for d in devices)
        return CheckResult("luks-devices", True, f"{len(devices)} LUKS device(s): {names}")
    more = f" ({len(excluded)} excluded by the config)" if excluded else ""
    return CheckResult("luks-devices", False, f"no active LUKS device found{more}")


def find_sleep_dropin(root: Path) -> Path | None:
    found = first_file([f"{d}/{SLEEP_DROPIN}" for d in UNIT_PATH], str(root))
    return Path(found) if found else None


# How our sleep entry shows in systemd-suspend.service's ExecStart= (the drop-in's line):
# the program $(LIBEXECDIR)/cryptlockd-sleep, C or Python (Makefile, SLEEP_ENTRY); or, from
# a drop-in of an older install, the module inside a `python3 -I -S -c` bootstrap.
SLEEP_ENTRY_PROGRAM = "cryptlockd-sleep"
SLEEP_ENTRY_MODULE = "cryptlockd.sleep_entry"


def is_sleep_entry(argv: Sequence[str]) -> bool:
    if argv and os.path.basename(argv[0]) == SLEEP_ENTRY_PROGRAM:
        return True
    return any(SLEEP_ENTRY_MODULE in a for a in argv)


def check_sleep_dropin(
    root: Path, exec_start: Sequence[Sequence[str]] | None = None
) -> CheckResult:
    """`exec_start`: the argv of each command of systemd-suspend.service's effective
    ExecStart= (systemd's D-Bus property), or None when systemd cannot be asked (then the
    file alone is judged). A drop-in that sorts after ours and resets ExecStart=, or a
    missing daemon-reload, leaves the file in place and the sleep without us."""
    found = find_sleep_dropin(root)
    if not found:
        return CheckResult(
            "sleep-drop-in",
            False,
            f"{SLEEP_DROPIN} is not installed in the unit search path: "
            "systemd-suspend.service would sleep without us",
        )
    if exec_start is None:
        return CheckResult(
            "sleep-drop-in", True, f"{found} installed (systemd not asked for the effective one)"
        )
    ours = [argv for argv in exec_start if is_sleep_entry(argv)]
    if ours and len(ours) == len(exec_start):
        return CheckResult("sleep-drop-in", True, f"{found} installed and in effect")
    shown = "; ".join(" ".join(argv) for argv in exec_start) or "nothing"
    return CheckResult(
        "sleep-drop-in",
        False,
        f"{found} is installed, but systemd-suspend.service runs {shown} "
        "(another drop-in resets ExecStart=, or systemd was not reloaded): "
        "the sleep would not be handed to the helper",
    )


def check_config(error: str | None) -> CheckResult:
    # Not blocking: we keep running with the last good config (or the defaults).
    if error is None:
        return CheckResult("config", True, "configuration valid", blocking=False)
    return CheckResult(
        "config", False, f"{error} (running with the last good settings)", blocking=False
    )


def check_enabled(enabled: bool) -> CheckResult:
    if enabled:
        return CheckResult("enabled", True, "protection enabled")
    return CheckResult("enabled", False, "protection disabled (config or SetEnabled)")


def check_helper(unavailable: str | None) -> CheckResult:
    """`unavailable`: why the armer cannot run the sleep-cycle helper, or None when it can."""
    if unavailable is None:
        return CheckResult("helper", True, "the sleep-cycle helper is available")
    return CheckResult("helper", False, f"{unavailable}: nothing would be wiped")


def check_helper_ramfs(ok: bool, detail: str) -> CheckResult:
    # The helper runs from it; without it arming fails and the sleep goes unprotected.
    if ok:
        return CheckResult("helper-ramfs", True, detail)
    return CheckResult("helper-ramfs", False, f"the helper's RAM filesystem: {detail}")


def check_helper_ramfs_rebuild(error: str) -> CheckResult:
    # Not blocking: the tree in use is stale but complete, and it still protects.
    return CheckResult(
        "helper-ramfs-rebuild",
        False,
        f"rebuilding the helper's RAM filesystem after its inputs changed failed: {error}; "
        "the previous one stays in use",
        blocking=False,
    )


def check_idle_helper(error: str) -> CheckResult:
    # Not blocking: arming starts the helper itself, only slower than the 1 s target.
    return CheckResult(
        "helper-idle",
        False,
        f"the helper could not be started ahead of the next sleep: {error}",
        blocking=False,
    )


def check_ready(not_ready: str | None) -> list[CheckResult]:
    """Start-up: the daemon told systemd it was ready before its helper was (a bounded
    wait ran out). The lines of the armer say what is missing."""
    if not_ready is None:
        return []
    return [CheckResult("ready", False, not_ready, blocking=False)]


def check_last_cycle(record: Mapping[str, Any]) -> list[CheckResult]:
    """A sleep whose wipe was not proven is a failed protection (SPEC 4), and a sleep the
    helper did not run at all was not protected (SPEC 2.8): either stays in Problems until
    the next cycle. No line before the first cycle."""
    if record.get("result") == "unprotected":
        # Until the next protected sleep replaces the record.
        return [
            CheckResult(
                "last-cycle",
                False,
                f"the last sleep was NOT protected: {record.get('reason') or 'unknown reason'}",
                blocking=False,
            )
        ]
    verification = record.get("verification")
    if not isinstance(verification, Mapping) or not verification:
        return []
    bad = []
    for dev, v in verification.items():
        if not isinstance(v, Mapping):
            continue
        ok = v.get("protected", "yes" if v.get("dm_table_key") == "zeroed" else "no") == "yes"
        if not ok:
            bad.append(
                f"{dev} (dm table key {v.get('dm_table_key')}, "
                f"keyring {v.get('keyring', 'not checked')})"
            )
    if bad:
        return [
            CheckResult(
                "last-cycle",
                False,
                "the last sleep did NOT protect " + "; ".join(bad),
                blocking=False,
            )
        ]
    return [
        CheckResult(
            "last-cycle",
            True,
            f"the last sleep wiped and verified {', '.join(verification)}",
            blocking=False,
        )
    ]


def evaluate(results: Sequence[CheckResult]) -> tuple[bool, list[str]]:
    """(Protected, Problems): protected when every blocking check passes; one line for
    each failed check, blocking or not."""
    protected = all(r.ok for r in results if r.blocking)
    problems = [f"{r.name}: {r.detail}" for r in results if not r.ok]
    return protected, problems
