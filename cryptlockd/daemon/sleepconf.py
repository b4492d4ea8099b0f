"""Which sleep state to write, as systemd-sleep would pick it from sleep.conf. Pure.

systemd parses SuspendState= (and SuspendMode= up to v255, MemorySleepMode= from v256) as
lists: each assignment appends, an empty one resets. The first state the kernel offers in
/sys/power/state wins; for "mem", the first offered mode of the mode list goes to
/sys/power/mem_sleep first, else the kernel default stays.
"""

from __future__ import annotations

from cryptlockd.searchpath import first_file, merged_dir

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from collections.abc import Iterable

DEFAULT_SUSPEND_STATES = ("mem", "standby", "freeze")
MAIN_FILES = (
    "/etc/systemd/sleep.conf",
    "/run/systemd/sleep.conf",
    "/usr/local/lib/systemd/sleep.conf",
    "/usr/lib/systemd/sleep.conf",
)
DROPIN_DIRS = (
    "/etc/systemd/sleep.conf.d",
    "/run/systemd/sleep.conf.d",
    "/usr/local/lib/systemd/sleep.conf.d",
    "/usr/lib/systemd/sleep.conf.d",
)


class NoSleepState(Exception):
    pass


def config_files(root: str = "/") -> list[str]:
    """The files systemd reads, in order: the first main file found, then the drop-ins."""
    main = first_file(MAIN_FILES, root)
    try:
        dropins = merged_dir(DROPIN_DIRS, ".conf", root)
    except OSError:
        dropins = []  # systemd-sleep would not read them either
    return ([main] if main else []) + dropins


def parse(texts: Iterable[str]) -> tuple[list[str] | None, list[str] | None]:
    """(suspend states, memory sleep modes) from the sleep.conf texts in order; None when
    never set."""
    states: list[str] | None = None
    modes: list[str] | None = None
    for text in texts:
        section = ""
        for raw in text.splitlines():
            line = raw.strip()
            if not line or line[0] in "#;":
                continue
            if line.startswith("[") and line.endswith("]"):
                section = line[1:-1].strip()
                continue
            if section != "Sleep" or "=" not in line:
                continue
            key, _, value = line.partition("=")
            key, words = key.strip(), value.split()
            if key == "SuspendState":
                states = [] if not words else (states or []) + words
            elif key in ("SuspendMode", "MemorySleepMode"):
                modes = [] if not words else (modes or []) + words
    return states, modes


def offered(sysfs_text: str) -> list[str]:
    """'s2idle [deep]' -> ['s2idle', 'deep']; 'freeze mem disk' -> those."""
    return [w.strip("[]") for w in sysfs_text.split()]


def kernel_default(mem_sleep_text: str) -> str | None:
    for w in mem_sleep_text.split():
        if w.startswith("[") and w.endswith("]"):
            return w[1:-1]
    return None


def _first_offered(wanted: list[str], sysfs_text: str, what: str) -> str:
    available = offered(sysfs_text)
    found = next((w for w in wanted if w in available), None)
    if found is None:
        raise NoSleepState(
            f"none of the {what} {' '.join(wanted)} is offered by the kernel ({sysfs_text.strip()})"
        )
    return found


def choose(texts: Iterable[str], power_state: str, mem_sleep: str) -> tuple[str, str | None]:
    """(state for /sys/power/state, mode for /sys/power/mem_sleep or None to keep it)."""
    states, modes = parse(texts)
    state = _first_offered(states or list(DEFAULT_SUSPEND_STATES), power_state, "suspend states")
    if state == "mem" and modes:
        return state, _first_offered(modes, mem_sleep, "memory sleep modes")
    return state, None
