"""Freeze every cgroup but the helper's own (cgroup v2 `cgroup.freeze`), thaw in reverse.

PID 1 (`init.scope`) is never frozen: while it runs, it keeps pinging a hardware watchdog
(RuntimeWatchdogSec=), so a user who takes a long time at the prompt does not get a reset.
PID 1 itself does not touch the suspended disks while the units around it are frozen; new
units it might start land in frozen slices and freeze at once.

The helper runs in a top-level slice of its own (cryptlockd.slice), so system.slice and
user.slice freeze as whole subtrees and nothing started later escapes.
"""

from __future__ import annotations

import os
import time

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from collections.abc import Iterable

CGROUP_ROOT = "/sys/fs/cgroup"
NEVER_FREEZE = ("init.scope",)


class FreezeError(Exception):
    pass


def own_cgroup(proc_self_cgroup: str) -> str:
    """'/cryptlockd.slice/x.service' from the text of /proc/self/cgroup (v2 line '0::')."""
    for line in proc_self_cgroup.splitlines():
        if line.startswith("0::"):
            return line[3:].strip() or "/"
    raise FreezeError("no cgroup v2 entry in /proc/self/cgroup (a unified hierarchy is needed)")


def _children(root: str, rel: str) -> list[str]:
    base = os.path.join(root, rel.lstrip("/"))
    try:
        entries = sorted(os.scandir(base), key=lambda e: e.name)
    except FileNotFoundError:
        return []
    return [f"{rel.rstrip('/')}/{e.name}" for e in entries if e.is_dir(follow_symlinks=False)]


def plan_freeze(root: str, keep: str) -> list[str]:
    """The cgroups to freeze (paths relative to root, '/a/b'): every subtree that neither
    holds `keep` nor is in NEVER_FREEZE, as high up as possible."""
    keep = "/" + keep.strip("/")
    out: list[str] = []

    def walk(rel: str) -> None:
        for child in _children(root, rel):
            if child.lstrip("/") in NEVER_FREEZE:
                continue
            if keep == child:
                continue
            if keep.startswith(child + "/"):
                walk(child)
                continue
            if not os.path.exists(os.path.join(root, child.lstrip("/"), "cgroup.freeze")):
                continue
            out.append(child)

    if not os.path.exists(os.path.join(root, "cgroup.procs")):
        raise FreezeError(f"no cgroup v2 hierarchy at {root}")
    walk("")
    if not out:
        raise FreezeError(f"nothing to freeze under {root}: is the hierarchy visible?")
    return out


def _path(root: str, rel: str, name: str) -> str:
    return os.path.join(root, rel.lstrip("/"), name)


def _read(path: str) -> str:
    with open(path) as f:
        return f.read()


def _write(path: str, value: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, value.encode())
    finally:
        os.close(fd)


def is_frozen(root: str, rel: str) -> bool:
    for line in _read(_path(root, rel, "cgroup.events")).splitlines():
        key, _, value = line.partition(" ")
        if key == "frozen":
            return value.strip() == "1"
    return False


def freeze(root: str, cgroups: Iterable[str], timeout: float, frozen: list[str]) -> None:
    """Freeze each cgroup, appending it to `frozen` as soon as it is asked to freeze (so the
    caller thaws exactly what was touched, even after an error), then wait until all say
    `frozen 1`. Cgroups someone else froze already are left alone and not listed."""
    for rel in cgroups:
        try:
            if _read(_path(root, rel, "cgroup.freeze")).strip() == "1":
                continue
            _write(_path(root, rel, "cgroup.freeze"), "1")
        except FileNotFoundError:
            continue  # the cgroup went away meanwhile
        frozen.append(rel)
    deadline = time.monotonic() + timeout
    waiting = list(frozen)
    while waiting:
        still = []
        for rel in waiting:
            try:
                if not is_frozen(root, rel):
                    still.append(rel)
            except FileNotFoundError:
                pass
        waiting = still
        if not waiting:
            return
        if time.monotonic() > deadline:
            raise FreezeError(f"not frozen after {timeout:g} s: {', '.join(waiting)}")
        time.sleep(0.005)


def thaw(root: str, frozen: list[str]) -> list[str]:
    """Thaw in reverse order; return the errors (a thaw must never stop half-way)."""
    errors: list[str] = []
    for rel in reversed(frozen):
        try:
            _write(_path(root, rel, "cgroup.freeze"), "0")
        except FileNotFoundError:
            pass
        except OSError as e:
            errors.append(f"{rel}: {e}")
    return errors
