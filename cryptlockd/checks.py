"""Self-checks behind Check(), Protected and Problems.

Each check is a pure function of its inputs (paths and facts passed in), so unit tests
reach them with a fake tree. None of them changes anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptlockd.devices import LuksDevice

# systemd's system unit search path, most specific first (systemd.unit(5)).
UNIT_SEARCH_PATH = (
    "etc/systemd/system",
    "run/systemd/system",
    "usr/local/lib/systemd/system",
    "usr/lib/systemd/system",
    "lib/systemd/system",
)
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
    return CheckResult("cgroup-v2", False,
                       f"no cgroup v2 hierarchy at {cgroup_root}: cannot freeze tasks")


def check_sync_on_suspend(sysfs: Path) -> CheckResult:
    # Without the knob the kernel syncs in suspend and hangs on the suspended disk.
    path = sysfs / "power" / "sync_on_suspend"
    if _exists(path):
        return CheckResult("sync-on-suspend", True, f"{path} present")
    return CheckResult("sync-on-suspend", False,
                       f"{path} missing (kernel older than 5.6?): suspend would hang in sync")


def check_suspend_to_ram(sysfs: Path) -> CheckResult:
    path = sysfs / "power" / "state"
    try:
        states = path.read_text().split()
    except OSError as e:
        return CheckResult("suspend-to-ram", False, f"cannot read {path}: {e.strerror}")
    if "mem" in states:
        return CheckResult("suspend-to-ram", True, f"{path}: {' '.join(states)}")
    return CheckResult("suspend-to-ram", False,
                       f"the kernel offers no suspend-to-RAM ({path}: {' '.join(states)})")


def check_logind(owner: str | None, inhibitor_held: bool, sleeping: bool) -> CheckResult:
    if owner is None:
        return CheckResult("logind", False, "logind (org.freedesktop.login1) is not on the bus")
    if sleeping:
        return CheckResult("logind", True,
                           f"logind at {owner}; inhibitor released for the sleep in progress")
    if not inhibitor_held:
        return CheckResult("logind", False,
                           f"logind at {owner}, but we hold no delay inhibitor: "
                           "a suspend would not wait for us")
    return CheckResult("logind", True, f"logind at {owner}; delay inhibitor held")


def check_inhibit_delay(delay_max_usec: int | None, arm_timeout_sec: float) -> CheckResult:
    # logind stops waiting for delay locks after InhibitDelayMaxSec; arming that takes
    # longer loses the race and the machine sleeps unprotected. Not blocking: arming
    # usually takes well under a second.
    if delay_max_usec is None:
        return CheckResult("inhibit-delay", True, "logind's InhibitDelayMaxSec unknown",
                           blocking=False)
    delay = delay_max_usec / 1e6
    if delay >= arm_timeout_sec:
        return CheckResult("inhibit-delay", True,
                           f"logind waits up to {delay:g} s; arming may take {arm_timeout_sec:g} s",
                           blocking=False)
    return CheckResult("inhibit-delay", False,
                       f"logind's InhibitDelayMaxSec={delay:g}s is shorter than "
                       f"cycle.arm_timeout_sec={arm_timeout_sec:g}: a slow arm would lose "
                       "the race and the machine would sleep unprotected", blocking=False)


def check_devices(devices: Sequence[LuksDevice], excluded: Sequence[str] = ()) -> CheckResult:
    if devices:
        names = ", ".join(d.name for d in devices)
        return CheckResult("luks-devices", True, f"{len(devices)} LUKS device(s): {names}")
    more = f" ({len(excluded)} excluded by the config)" if excluded else ""
    return CheckResult("luks-devices", False, f"no active LUKS device found{more}")


def find_sleep_dropin(root: Path) -> Path | None:
    for d in UNIT_SEARCH_PATH:
        candidate = root / d / SLEEP_DROPIN
        if _exists(candidate, regular_file=True):
            return candidate
    return None


def check_sleep_dropin(root: Path) -> CheckResult:
    found = find_sleep_dropin(root)
    if found:
        return CheckResult("sleep-drop-in", True, f"{found} installed")
    return CheckResult("sleep-drop-in", False,
                       f"{SLEEP_DROPIN} is not installed in the unit search path: "
                       "systemd-suspend.service would sleep without us")


def check_config(error: str | None) -> CheckResult:
    # Not blocking: we keep running with the last good config (or the defaults).
    if error is None:
        return CheckResult("config", True, "configuration valid", blocking=False)
    return CheckResult("config", False, f"{error} (running with the last good settings)",
                       blocking=False)


def check_enabled(enabled: bool) -> CheckResult:
    if enabled:
        return CheckResult("enabled", True, "protection enabled")
    return CheckResult("enabled", False, "protection disabled (config or SetEnabled)")


def check_armer(kind: str) -> CheckResult:
    if kind == "helper":
        return CheckResult("helper", True, "the sleep-cycle helper is available")
    return CheckResult("helper", False,
                       f"armer '{kind}' only records the cycle: nothing would be wiped")


def check_helper_ramfs(ok: bool, detail: str) -> CheckResult:
    # The helper runs from it; without it arming fails and the sleep goes unprotected.
    if ok:
        return CheckResult("helper-ramfs", True, detail)
    return CheckResult("helper-ramfs", False, f"the helper's RAM filesystem: {detail}")


def evaluate(results: Sequence[CheckResult]) -> tuple[bool, list[str]]:
    """(Protected, Problems): protected when every blocking check passes; one line for
    each failed check, blocking or not."""
    protected = all(r.ok for r in results if r.blocking)
    problems = [f"{r.name}: {r.detail}" for r in results if not r.ok]
    return protected, problems
