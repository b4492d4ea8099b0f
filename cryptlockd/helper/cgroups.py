"""Freeze every cgroup but the helper's own (cgroup v2 `cgroup.freeze`), thaw in reverse.

PID 1 (`init.scope`) is never frozen: while it runs, it keeps pinging a hardware watchdog
(RuntimeWatchdogSec=), so a user who takes a long time at the prompt does not get a reset.
PID 1 itself does not touch the suspended disks while the units around it are frozen; new
units it might start land in frozen slices and freeze at once.

The helper runs in a top-level slice of its own (cryptlockd.slice), so system.slice and
user.slice freeze as whole subtrees and nothing started later escapes.
"""

from __future__ import annotations

import errno
import os
import select
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


def _frozen_in(events: str) -> bool:
    for line in events.splitlines():
        key, _, value = line.partition(" ")
        if key == "frozen":
            return value.strip() == "1"
    return False


# The longest wait between two looks at a cgroup.events the kernel did not say changed.
LOOK_AGAIN = 0.05


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
    _wait_frozen(root, list(frozen), time.monotonic() + timeout, timeout)


def _wait_frozen(root: str, waiting: list[str], deadline: float, timeout: float) -> None:
    """Until every cgroup in `waiting` says `frozen 1` (or is gone). cgroup.events wakes a
    poll() with POLLPRI when it changes, so the freeze is seen as it happens, not at the
    next look (issue 12); the looks every LOOK_AGAIN are a safety net."""
    files: dict[str, int] = {}
    poller = select.poll()
    try:
        for rel in waiting:
            try:
                fd = os.open(_path(root, rel, "cgroup.events"), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # the cgroup went away meanwhile
            files[rel] = fd
            poller.register(fd, select.POLLPRI)
        while files:
            for rel, fd in list(files.items()):
                try:
                    # Reading it again is what re-arms its POLLPRI.
                    done = _frozen_in(os.pread(fd, 4096, 0).decode(errors="replace"))
                except OSError as e:
                    if e.errno not in (errno.ENODEV, errno.ENOENT):
                        raise
                    done = True  # the cgroup was removed meanwhile
                if done:
                    poller.unregister(fd)
                    os.close(files.pop(rel))
            if not files:
                return
            left = deadline - time.monotonic()
            if left <= 0:
                raise FreezeError(f"not frozen after {timeout:g} s: {', '.join(files)}")
            poller.poll(min(left, LOOK_AGAIN) * 1000)
    finally:
        for fd in files.values():
            os.close(fd)


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
