"""The helper's RAM filesystem, kept current for the armer (helper_armer.py).

One task (_keep_tree) builds and swaps trees: built at start, then rebuilt when inotify
says one of its inputs changed (an upgrade of python, libc, libcryptsetup or of
cryptlockd). A rebuild never happens in the arm window: it goes into a staging tree while
the live one, stale but complete, keeps serving, and the staged tree is swapped in only
under the arm lock and while no helper is armed or mid-cycle; after a sleep otherwise.

The keeper knows nothing of systemd or of arming: the armer tells it whether a helper is
armed, starts the idle helper for it and waits for a busy one to exit.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Awaitable, Callable
from typing import TypeVar

from cryptlockd.daemon import checks, helper_socket
from cryptlockd.daemon.armer import CycleRecord
from cryptlockd.daemon.checks import CheckResult
from cryptlockd.daemon.inotify import InputWatcher
from cryptlockd.daemon.ramfs import SIZE_TARGET, Ramfs, watch_targets
from cryptlockd.daemon.repair import repair, take_recovered_record

__all__ = ["RamfsKeeper"]

log = logging.getLogger(__name__)

T = TypeVar("T")

# An upgrade writes many files over some seconds: rebuild once they have been quiet this
# long, but never put a rebuild off by more than INPUT_MAX_DELAY.
INPUT_QUIET = 1.0
INPUT_MAX_DELAY = 10.0
# A rebuild yields the CPU to everything else (the daemon and the helper run at -10):
# an arm that comes while it runs must not queue behind it.
REBUILD_NICENESS = 10


def _in_thread(fn: Callable[[], T], niceness: int | None = None) -> asyncio.Future[T]:
    """Runs `fn` in a thread of its own (at `niceness`, which its children inherit: Linux
    keeps a nice value per thread) and returns a future the loop can await."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: Exception | None) -> None:
        if fut.done():  # cancelled: nobody waits any more
            return
        if error is not None:
            fut.set_exception(error)
        else:
            fut.set_result(result)  # type: ignore[arg-type]  # T when there is no error

    def body() -> None:
        if niceness is not None:
            with contextlib.suppress(OSError):
                os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), niceness)
        result: T | None = None
        error: Exception | None = None
        try:
            result = fn()
        except Exception as e:
            error = e
        with contextlib.suppress(RuntimeError):  # the loop is closed: we are stopping
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=body, daemon=True, name="ramfs").start()
    return fut


class RamfsKeeper:
    def __init__(
        self,
        ramfs: Ramfs,
        socket_path: str,
        arm_lock: asyncio.Lock,
        *,
        armed: Callable[[], bool],
        start_idle: Callable[[bool], Awaitable[None]],
        helper_exited: Callable[[], Awaitable[None]],
        status_changed: Callable[[], None],
        recovered: Callable[[CycleRecord], None],
    ) -> None:
        """`arm_lock` is held by the armer while it arms; `armed()` says whether a helper
        of ours is armed or mid-cycle; `start_idle(after_exit)` starts the idle helper;
        `helper_exited()` returns once a busy helper has exited; `recovered(record)` gets
        the record of a dead helper's recovery, found in the tree at start."""
        self.ramfs = ramfs
        self.socket_path = socket_path
        self._arm_lock = arm_lock
        self._armed = armed
        self._start_idle = start_idle
        self._helper_exited = helper_exited
        self._status_changed = status_changed
        self._recovered = recovered
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()  # something for the keeper to look at
        self.tree_ready = asyncio.Event()  # a live tree exists, or the first build failed
        self._first_pass = asyncio.Event()  # start-up done: tree built, idle helper listening
        self._building = False
        self._staged = False  # a new tree waits in the staging place
        self.build_error: str | None = None
        self._watcher: InputWatcher | None = None
        self._rewatch = False
        self._input_timer: asyncio.TimerHandle | None = None
        self._input_since: float | None = None
        self._exit_waiter: asyncio.Task[None] | None = None

    def keep(self) -> None:
        """Starts keeping the tree; later calls retry a failed build (Reload())."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not serving (a test that only evaluates)
        if self._task is None:
            # Built at start, in the background: a build takes seconds, arming must not.
            self._task = loop.create_task(self._keep_tree())
        else:
            self.retry_failed_build()

    def retry_failed_build(self) -> None:
        if self.build_error is not None:
            self._wake.set()

    def swap_after_cycle(self) -> bool:
        """A cycle or a disarm ended: True when a staged tree goes in now (the keeper then
        starts the idle helper from it)."""
        if self._staged:
            self._wake.set()
        return self._staged

    async def ready(self) -> None:
        if self._task is None:
            return
        await self._first_pass.wait()

    async def _keep_tree(self) -> None:
        """The only one that builds and swaps trees, one thing after the other."""
        first = True
        while True:
            try:
                await self._keep_once(first)
            except Exception:
                log.exception("keeping the helper's RAM filesystem failed")
            if first:
                first = False
                self.tree_ready.set()
                self._first_pass.set()
                self._status_changed()
            await self._wake.wait()
            self._wake.clear()

    async def _keep_once(self, first: bool) -> None:
        if first:
            await asyncio.to_thread(repair, self.ramfs.path, self.socket_path)
            # Taken before a swap can drop the tree that holds it.
            record = await asyncio.to_thread(take_recovered_record, self.ramfs.path)
            if record is not None:
                self._recovered(record)
            if await asyncio.to_thread(self.ramfs.load):
                # Left by the daemon that ran before us: it serves while it is checked.
                self.tree_ready.set()
                self._rewatch = True
                await self._start_idle(False)
        if not await asyncio.to_thread(self._up_to_date):
            await self._stage(first)
        if self._staged:
            await self._swap()
        if self._rewatch and self.ramfs.size:
            await self._watch_inputs()

    def _up_to_date(self) -> bool:
        if self._staged:
            return self.ramfs.staged_current()
        return self.ramfs.current()

    async def _stage(self, first: bool) -> None:
        had_tree = self.ramfs.size > 0
        if had_tree:
            log.info("the helper's RAM filesystem is stale: building a new one beside it")
        self._building, self._staged = True, False
        self._status_changed()
        try:
            await _in_thread(self.ramfs.stage, None if first else REBUILD_NICENESS)
            self._staged, self.build_error = True, None
        except Exception as e:
            self.build_error = str(e)
            log.error(
                "cannot build the helper's RAM filesystem: %s%s",
                e,
                "; the one in use stays" if had_tree else "",
            )
        finally:
            self._building = False
            self._status_changed()

    async def _swap(self) -> bool:
        """The staged tree in, under the arm lock, while no helper of ours is armed or
        mid-cycle; a busy helper we did not arm (the daemon restarted mid-cycle) is waited
        for. Then a fresh idle helper from the new tree."""
        async with self._arm_lock:
            if self._armed():
                log.info("a new helper RAM filesystem is ready; swapped in after this sleep")
                return False
            if not await asyncio.to_thread(self._stand_down_idle):
                log.warning(
                    "a new helper RAM filesystem is ready, but a helper is busy in the "
                    "current one; swapped in once it exits"
                )
                self._wake_when_helper_exits()
                return False
            await asyncio.to_thread(self.ramfs.swap_in)
            self._staged = False
        log.info(
            "helper RAM filesystem swapped in: %.1f MiB (%s)",
            self.ramfs.size / 2**20,
            self.ramfs.digest[:12],
        )
        self.tree_ready.set()
        self._rewatch = True
        self._status_changed()
        await self._start_idle(True)
        return True

    def _stand_down_idle(self) -> bool:
        """True once no helper runs from the live tree (an idle one is told to go), after
        the repair of what a dead one left there: the tree is about to go."""
        if helper_socket.alive(self.socket_path) and not helper_socket.stop_idle(self.socket_path):
            return False
        repair(self.ramfs.path, self.socket_path)
        return True

    def _wake_when_helper_exits(self) -> None:
        if self._exit_waiter is not None and not self._exit_waiter.done():
            return

        async def wait() -> None:
            await self._helper_exited()
            self._wake.set()

        self._exit_waiter = asyncio.get_running_loop().create_task(wait())

    async def _watch_inputs(self) -> None:
        self._rewatch = False
        manifest = await asyncio.to_thread(self.ramfs.manifest)
        if self._watcher is not None:
            self._watcher.close()
            self._watcher = None
        try:
            watcher = InputWatcher(watch_targets(manifest or {}), self._input_changed)
        except OSError as e:
            log.error("cannot watch the helper's RAM filesystem inputs: %s", e)
            return
        for missing in watcher.missing:
            log.warning("cannot watch %s", missing)
        watcher.start(asyncio.get_running_loop())
        self._watcher = watcher
        log.info("watching %d directories for changes to the helper's inputs", watcher.directories)
        # A change between the manifest's stamps and the watch has no event: look once.
        if not await asyncio.to_thread(self._up_to_date):
            self._input_changed(None)

    def _input_changed(self, path: str | None) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        if path is None:
            self._rewatch = True
        if self._input_since is None:
            self._input_since = now
            log.info(
                "an input of the helper's RAM filesystem changed (%s): it will be rebuilt",
                path or "unknown",
            )
        if self._input_timer is not None:
            self._input_timer.cancel()
        delay = min(INPUT_QUIET, max(0.0, self._input_since + INPUT_MAX_DELAY - now))
        self._input_timer = loop.call_later(delay, self._inputs_settled)

    def _inputs_settled(self) -> None:
        self._input_timer = self._input_since = None
        self._wake.set()

    def status(self) -> list[CheckResult]:
        """The lines about the tree: in use, being rebuilt or staged, a failed rebuild."""
        if not self.ramfs.size:
            return [checks.check_helper_ramfs(False, self.build_error or "not built yet")]
        detail = (
            f"{self.ramfs.path}: {self.ramfs.size / 2**20:.1f} MiB "
            f"(target {SIZE_TARGET // 2**20} MiB or less)"
        )
        if self._building:
            detail += "; its inputs changed, a new one is being built beside it"
        elif self._staged:
            detail += "; its inputs changed, a new one is swapped in after this sleep"
        lines = [checks.check_helper_ramfs(True, detail)]
        if self.build_error:
            lines.append(checks.check_helper_ramfs_rebuild(self.build_error))
        return lines
