"""Keeping the helper's RAM filesystem (cryptlockd/daemon/ramfs_keeper.py, issue 10),
driven through the armer that owns the keeper: ready only with a tree and a listening
helper; a sleep before the first build waits for it within the arm timeout; a changed input
is rebuilt beside the tree in use, which arms at once, and swapped in only after the cycle."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import pytest_asyncio

from cryptlockd.daemon import helper_armer, ramfs_keeper
from cryptlockd.daemon.config import Config
from cryptlockd.daemon.helper_armer import HelperArmer, HelperError
from cryptlockd.daemon.ramfs import Ramfs
from cryptlockd.helper import protocol
from tests.unit.test_helper_armer import FakeUnit, armer
from tests.wait import wait_until_async


class FakeTree(Ramfs):
    """The live and staged trees as flags; one input file stands for the closure. stage()
    waits for `go` (a build takes seconds) and fails with `fail`."""

    def __init__(self, tmp_path: Path, live: bool) -> None:
        super().__init__(str(tmp_path / "ramfs"), mount=False)
        self.input = tmp_path / "libx.so.1"
        self.input.write_text("v1")
        self.live_stamp: int | None = self._stamp() if live else None
        self.staged_stamp: int | None = None
        self.go = threading.Event()
        self.fail: str | None = None
        self.stages = self.swaps = 0

    def _stamp(self) -> int:
        return self.input.stat().st_mtime_ns

    def manifest(self) -> dict[str, object] | None:
        if self.live_stamp is None:
            return None
        return {"inputs": [[str(self.input), 2, self.live_stamp]]}

    def load(self) -> bool:
        self.size = 1 if self.live_stamp is not None else 0
        return bool(self.size)

    def current(self) -> bool:
        return self.live_stamp == self._stamp()

    def staged_current(self) -> bool:
        return self.staged_stamp == self._stamp()

    def stage(self) -> dict[str, object]:
        stamp = self._stamp()
        assert self.go.wait(10)
        self.stages += 1
        if self.fail:
            raise RuntimeError(self.fail)
        self.staged_stamp = stamp
        return {}

    def swap_in(self) -> None:
        self.live_stamp, self.staged_stamp = self.staged_stamp, None
        self.swaps += 1
        self.size = 1

    def change_input(self) -> None:
        st = self.input.stat()
        os.utime(self.input, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))


class FakeHelper:
    """A helper socket: answers `arm` with `armed` and sends the record when told; exits on
    `disarm`. The fake unit's StartUnit starts it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.server: asyncio.AbstractServer | None = None
        self.armed: asyncio.StreamWriter | None = None
        self.arms = 0

    async def start(self) -> None:
        self.server = await asyncio.start_unix_server(self._serve, str(self.path))

    def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            self.server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        line = await reader.readline()
        if not line:
            return
        msg = protocol.decode(line)
        if msg["op"] == protocol.OP_ARM:
            self.arms += 1
            self.armed = writer
            writer.write(protocol.encode({"op": "armed", "vt": 8, "reserve_kib": 0, "pid": 1}))
        elif msg["op"] == protocol.OP_DISARM:
            self.stop()
            writer.close()

    async def finish_cycle(self) -> None:
        assert self.armed is not None
        record = {"started_boottime": 0.0, "timeline_ms": {}}
        self.armed.write(protocol.encode({"op": "record", "success": True, "record": record}))
        await self.armed.drain()
        self.armed.close()
        self.armed = None
        self.stop()  # the helper exits after a cycle


class HelperUnit(FakeUnit):
    def __init__(self, helper: FakeHelper) -> None:
        super().__init__(["inactive"])
        self.helper = helper

    async def start(self) -> None:
        await super().start()
        if self.helper.server is None:
            await self.helper.start()


Kept = tuple[HelperArmer, FakeTree, FakeHelper]


@pytest_asyncio.fixture
async def keeper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Callable[..., Kept]]:
    """Makes an armer keeping a FakeTree (`live`: a current tree is already there), its
    helper started by the fake unit; afterwards the build thread is let go and the helper
    stopped, even when the test failed."""
    made: list[Kept] = []

    def make(*, live: bool, arm_timeout: float = 5.0) -> Kept:
        tree = FakeTree(tmp_path, live)
        helper = FakeHelper(tmp_path / "s")
        a = HelperArmer(
            None,  # type: ignore[arg-type]  # the fake unit makes every call
            ramfs=tree,
            socket_path=str(tmp_path / "s"),
            under_systemd=True,
        )
        a.unit = HelperUnit(helper)  # type: ignore[assignment]
        monkeypatch.setattr(helper_armer, "choose_sleep_state", lambda: ("mem", "deep"))
        monkeypatch.setattr(ramfs_keeper, "INPUT_QUIET", 0.05)
        config = Config.model_validate({"cycle": {"arm_timeout_sec": arm_timeout}})
        a.configure(config)
        made.append((a, tree, helper))
        return a, tree, helper

    yield make
    for _a, tree, helper in made:
        tree.go.set()
        helper.stop()


@pytest_asyncio.fixture
async def ready_keeper(keeper: Callable[..., Kept]) -> Kept:
    """A current tree at start: ready without a build, its idle helper listening."""
    a, tree, helper = keeper(live=True)
    await asyncio.wait_for(a.ready(), 5)
    return a, tree, helper


async def arm(a: HelperArmer, records: list[bool]) -> None:
    await asyncio.wait_for(a.arm([], lambda ok, record: records.append(ok)), 10)


@pytest.mark.asyncio
async def test_ready_only_once_the_first_tree_is_in_and_its_helper_listens(
    keeper: Callable[..., Kept],
) -> None:
    a, tree, helper = keeper(live=False)
    ready = asyncio.get_running_loop().create_task(a.ready())
    await asyncio.sleep(0.2)
    assert not ready.done()
    assert [r.detail for r in a.status() if r.name == "helper-ramfs"] == [
        "the helper's RAM filesystem: not built yet"
    ]
    tree.go.set()
    await asyncio.wait_for(ready, 5)
    assert (tree.stages, tree.swaps) == (1, 1)
    assert helper.server is not None  # listening
    assert all(r.ok for r in a.status())


@pytest.mark.asyncio
async def test_a_sleep_before_the_first_build_waits_for_it(keeper: Callable[..., Kept]) -> None:
    a, tree, helper = keeper(live=False)
    records: list[bool] = []
    arming = asyncio.get_running_loop().create_task(arm(a, records))
    await asyncio.sleep(0.2)
    assert not arming.done()
    tree.go.set()
    await asyncio.wait_for(arming, 5)
    assert helper.arms == 1
    await helper.finish_cycle()
    await wait_until_async(lambda: records == [True], 5.0, message="the record")


@pytest.mark.asyncio
async def test_a_sleep_before_the_first_build_that_does_not_finish_is_unprotected(
    keeper: Callable[..., Kept],
) -> None:
    a, _tree, helper = keeper(live=False, arm_timeout=0.3)
    with pytest.raises(HelperError, match="still being built when the sleep came"):
        await arm(a, [])
    assert helper.arms == 0


@pytest.mark.asyncio
async def test_a_changed_input_is_rebuilt_beside_and_swapped_in_after_the_sleep(
    ready_keeper: Kept,
) -> None:
    a, tree, helper = ready_keeper  # the tree was current: no build
    assert (tree.stages, tree.swaps) == (0, 0) and helper.server is not None
    # An upgrade replaces an input: inotify, then a rebuild, which waits for `go`.
    tree.change_input()
    await wait_until_async(lambda: a.keeper._building, 5.0, message="the rebuild to start")
    assert "a new one is being built beside it" in a.status()[1].detail
    # A sleep now is armed at once from the stale tree, by the idle helper that runs in it.
    records: list[bool] = []
    t0 = time.monotonic()
    await arm(a, records)
    assert helper.arms == 1 and time.monotonic() - t0 < 1.0
    # The new tree is built meanwhile, but not swapped in while the helper is armed.
    tree.go.set()
    await wait_until_async(lambda: a.keeper._staged, 5.0, message="the new tree staged")
    await asyncio.sleep(0.1)
    assert tree.swaps == 0
    assert "swapped in after this sleep" in a.status()[1].detail
    # After the cycle: swapped in, and a fresh idle helper from the new tree.
    await helper.finish_cycle()
    await wait_until_async(lambda: tree.swaps == 1, 5.0, message="the swap after the cycle")
    await wait_until_async(lambda: helper.server is not None, 5.0, message="a new idle helper")
    assert records == [True] and tree.current() and all(r.ok for r in a.status())


@pytest.mark.asyncio
async def test_a_swap_stops_the_idle_helper_first_and_starts_one_from_the_new_tree(
    ready_keeper: Kept,
) -> None:
    _a, tree, helper = ready_keeper
    first = helper.server
    tree.go.set()
    tree.change_input()
    await wait_until_async(lambda: tree.swaps == 1, 5.0, message="the swap")
    await wait_until_async(lambda: helper.server is not None, 5.0, message="a new idle helper")
    assert helper.server is not first  # the old one was told to stand down


@pytest.mark.asyncio
async def test_a_failed_rebuild_keeps_the_tree_in_use_and_says_so(ready_keeper: Kept) -> None:
    a, tree, helper = ready_keeper
    tree.fail = "libcryptsetup.so.12: not found"
    tree.go.set()
    tree.change_input()
    await wait_until_async(
        lambda: a.keeper.build_error is not None, 5.0, message="the failed rebuild"
    )
    lines = {r.name: r for r in a.status()}
    assert lines["helper-ramfs"].ok
    rebuild = lines["helper-ramfs-rebuild"]
    assert not rebuild.ok and not rebuild.blocking and "not found" in rebuild.detail
    # Still protected: the next sleep arms from the tree in use.
    records: list[bool] = []
    await arm(a, records)
    # After that sleep the rebuild is tried again (frozen commands may have timed out).
    tree.fail = None
    await helper.finish_cycle()
    await wait_until_async(lambda: tree.swaps == 1, 5.0, message="the retried rebuild swapped in")
    assert a.keeper.build_error is None


@pytest.mark.asyncio
async def test_input_changes_are_gathered_but_never_put_off_for_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ramfs_keeper, "INPUT_QUIET", 0.2)
    monkeypatch.setattr(ramfs_keeper, "INPUT_MAX_DELAY", 0.4)
    k = armer(tmp_path, FakeUnit(["inactive"]), monkeypatch).keeper
    t0 = time.monotonic()
    k._input_changed("/usr/lib/libx.so.1")
    await asyncio.sleep(0.1)
    assert not k._wake.is_set()  # an upgrade writes on: wait for quiet
    # Changes that never stop still wake the keeper once INPUT_MAX_DELAY has passed.
    while not k._wake.is_set():
        assert time.monotonic() - t0 < 2.0
        k._input_changed("/usr/lib/libx.so.1")
        await asyncio.sleep(0.05)
    assert 0.35 < time.monotonic() - t0 < 0.7
    assert k._input_since is None  # the next change starts a new batch


@pytest.mark.asyncio
async def test_a_recovered_cycle_left_in_the_tree_is_reported_once_at_start(
    tmp_path: Path, keeper: Callable[..., Kept]
) -> None:
    # The daemon restarted after a dead helper's recovery: its record is the last cycle.
    state = tmp_path / "ramfs" / "state"
    state.mkdir(parents=True)
    (state / "recovered.json").write_text('{"reason": "the helper died mid-cycle; recovered"}')
    got: list[tuple[bool, object]] = []
    a, _tree, _helper = keeper(live=True)
    a.watch(lambda: None, lambda ok, record: got.append((ok, record["reason"])))
    await asyncio.wait_for(a.ready(), 5)
    assert got == [(False, "the helper died mid-cycle; recovered")]
    assert not (state / "recovered.json").exists()
