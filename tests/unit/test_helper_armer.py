"""The daemon's helper armer (cryptlockd/daemon/helper_armer.py).

Starting the idle helper: StartUnit must wait until systemd has seen the last helper go.
Until systemd reaps an exited helper its unit is still active, and StartUnit on an active
unit does nothing (the guest showed a sleep right after a cycle going unprotected).

Keeping the RAM filesystem (issue 10): ready only with a tree and a listening helper; a sleep
before the first build waits for it within the arm timeout; a changed input is rebuilt beside
the tree in use, which arms at once, and swapped in only after the cycle."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import Callable, Collection
from pathlib import Path

import pytest

from cryptlockd.daemon import helper_armer, helper_socket
from cryptlockd.daemon.config import Config
from cryptlockd.daemon.helper_armer import HelperArmer, HelperError
from cryptlockd.daemon.ramfs import Ramfs
from cryptlockd.helper import protocol


class FakeUnit:
    """systemd's view of the helper unit: one state per read, and a change after each."""

    name = "cryptlockd-helper.service"

    def __init__(self, states: list[str]) -> None:
        self.states = states
        self.calls: list[str] = []
        self.reads = 0

    def next_change(self) -> asyncio.Event:
        changed = asyncio.Event()
        if len(self.states) > 1:
            changed.set()  # the state read next differs
        return changed

    async def active_state(self) -> str:
        state = self.states.pop(0) if len(self.states) > 1 else self.states[0]
        self.calls.append(state)
        return state

    async def start(self) -> None:
        self.calls.append("StartUnit")

    async def stop(self) -> None:
        self.calls.append("StopUnit")

    async def wait_while(self, states: Collection[str], deadline: float) -> str:
        while (state := await self.active_state()) in states and time.monotonic() < deadline:
            await asyncio.sleep(0)
        return state


def armer(
    tmp_path: Path, fake: FakeUnit, monkeypatch: pytest.MonkeyPatch, alive: bool = False
) -> HelperArmer:
    a = HelperArmer(
        None,  # type: ignore[arg-type]  # the fake unit makes every call
        ramfs=Ramfs(str(tmp_path / "ramfs"), mount=False),
        socket_path=str(tmp_path / "s"),
        under_systemd=True,
    )
    a.unit = fake  # type: ignore[assignment]
    monkeypatch.setattr(helper_socket, "alive", lambda path: alive)
    return a


@pytest.mark.asyncio
async def test_start_waits_until_the_exited_helper_is_reaped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUnit(["active", "active", "deactivating", "inactive"])
    await armer(tmp_path, fake, monkeypatch)._start_unit(time.monotonic() + 5)
    assert fake.calls == ["active", "active", "deactivating", "inactive", "StartUnit"]


@pytest.mark.asyncio
async def test_a_listening_helper_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUnit(["active"])
    await armer(tmp_path, fake, monkeypatch, alive=True)._start_unit(time.monotonic() + 5)
    assert "StartUnit" not in fake.calls


@pytest.mark.asyncio
async def test_a_helper_that_starts_listening_is_not_started_again(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Type=simple: the unit is active at once, the helper listens a little later, and
    # systemd announces nothing in between. The socket is watched for that.
    fake = FakeUnit(["active"])
    a = armer(tmp_path, fake, monkeypatch)
    looks = iter([False, False, True])
    monkeypatch.setattr(helper_socket, "alive", lambda path: next(looks))
    await a._start_unit(time.monotonic() + 5)
    assert fake.calls == ["active"]


@pytest.mark.asyncio
async def test_a_unit_that_stays_active_without_a_helper_is_an_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUnit(["active"])
    with pytest.raises(HelperError, match="still active"):
        await armer(tmp_path, fake, monkeypatch)._start_unit(time.monotonic() + 0.2)
    assert "StartUnit" not in fake.calls


@pytest.mark.asyncio
async def test_after_a_cycle_the_idle_helper_starts_once_the_unit_is_down(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake = FakeUnit(["active", "inactive"])
    a = armer(tmp_path, fake, monkeypatch)
    a.ramfs.size = 1  # a tree to start it from
    monkeypatch.setattr(helper_socket, "alive", lambda path: "StartUnit" in fake.calls)
    await a._prestart(after_exit=True)
    assert fake.calls == ["active", "inactive", "inactive", "StartUnit"]
    assert a._idle_error is None


def test_without_systemd_nothing_is_built_or_armed(tmp_path: Path) -> None:
    a = HelperArmer(
        None,  # type: ignore[arg-type]
        ramfs=Ramfs(str(tmp_path / "ramfs"), mount=False),
        socket_path=str(tmp_path / "s"),
        under_systemd=False,
    )
    a.configure(Config())
    assert a._keeper is None
    [line] = a.status()
    assert line.name == "helper" and not line.ok
    assert (
        line.detail == "not running under systemd (no /run/systemd/system): nothing would be wiped"
    )
    with pytest.raises(HelperError, match="not running under systemd"):
        asyncio.run(a.arm([], lambda ok, record: None))


# -- keeping the RAM filesystem: never a rebuild in the arm window -----------------------


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


async def until(check: Callable[[], object], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.01)


def keeper(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, live: bool, arm_timeout: float = 5.0
) -> tuple[HelperArmer, FakeTree, FakeHelper]:
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
    monkeypatch.setattr(helper_armer, "INPUT_QUIET", 0.05)
    config = Config.model_validate({"cycle": {"arm_timeout_sec": arm_timeout}})
    a.configure(config)
    return a, tree, helper


async def arm(a: HelperArmer, records: list[bool]) -> None:
    await asyncio.wait_for(a.arm([], lambda ok, record: records.append(ok)), 10)


@pytest.mark.asyncio
async def test_ready_only_once_the_first_tree_is_in_and_its_helper_listens(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, tree, helper = keeper(tmp_path, monkeypatch, live=False)
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
    helper.stop()


@pytest.mark.asyncio
async def test_a_sleep_before_the_first_build_waits_for_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, tree, helper = keeper(tmp_path, monkeypatch, live=False)
    records: list[bool] = []
    arming = asyncio.get_running_loop().create_task(arm(a, records))
    await asyncio.sleep(0.2)
    assert not arming.done()
    tree.go.set()
    await asyncio.wait_for(arming, 5)
    assert helper.arms == 1
    await helper.finish_cycle()
    await until(lambda: records == [True], "the record")
    helper.stop()


@pytest.mark.asyncio
async def test_a_sleep_before_the_first_build_that_does_not_finish_is_unprotected(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, tree, helper = keeper(tmp_path, monkeypatch, live=False, arm_timeout=0.3)
    with pytest.raises(HelperError, match="still being built when the sleep came"):
        await arm(a, [])
    assert helper.arms == 0
    tree.go.set()  # let the keeper's thread end


@pytest.mark.asyncio
async def test_a_changed_input_is_rebuilt_beside_and_swapped_in_after_the_sleep(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, tree, helper = keeper(tmp_path, monkeypatch, live=True)
    await asyncio.wait_for(a.ready(), 5)  # the tree was current: no build
    assert (tree.stages, tree.swaps) == (0, 0) and helper.server is not None
    # An upgrade replaces an input: inotify, then a rebuild, which waits for `go`.
    tree.change_input()
    await until(lambda: a._building, "the rebuild to start")
    assert "a new one is being built beside it" in a.status()[1].detail
    # A sleep now is armed at once from the stale tree, by the idle helper that runs in it.
    records: list[bool] = []
    t0 = time.monotonic()
    await arm(a, records)
    assert helper.arms == 1 and time.monotonic() - t0 < 1.0
    # The new tree is built meanwhile, but not swapped in while the helper is armed.
    tree.go.set()
    await until(lambda: a._staged, "the new tree staged")
    await asyncio.sleep(0.1)
    assert tree.swaps == 0
    assert "swapped in after this sleep" in a.status()[1].detail
    # After the cycle: swapped in, and a fresh idle helper from the new tree.
    await helper.finish_cycle()
    await until(lambda: tree.swaps == 1, "the swap after the cycle")
    await until(lambda: helper.server is not None, "a new idle helper")
    assert records == [True] and tree.current() and all(r.ok for r in a.status())
    helper.stop()


@pytest.mark.asyncio
async def test_a_swap_stops_the_idle_helper_first_and_starts_one_from_the_new_tree(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, tree, helper = keeper(tmp_path, monkeypatch, live=True)
    await asyncio.wait_for(a.ready(), 5)
    first = helper.server
    tree.go.set()
    tree.change_input()
    await until(lambda: tree.swaps == 1, "the swap")
    await until(lambda: helper.server is not None, "a new idle helper")
    assert helper.server is not first  # the old one was told to stand down
    helper.stop()


@pytest.mark.asyncio
async def test_a_failed_rebuild_keeps_the_tree_in_use_and_says_so(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, tree, helper = keeper(tmp_path, monkeypatch, live=True)
    await asyncio.wait_for(a.ready(), 5)
    tree.fail = "libcryptsetup.so.12: not found"
    tree.go.set()
    tree.change_input()
    await until(lambda: a._build_error is not None, "the failed rebuild")
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
    await until(lambda: tree.swaps == 1, "the retried rebuild swapped in")
    assert a._build_error is None
    helper.stop()


@pytest.mark.asyncio
async def test_input_changes_are_gathered_but_never_put_off_for_long(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(helper_armer, "INPUT_QUIET", 0.2)
    monkeypatch.setattr(helper_armer, "INPUT_MAX_DELAY", 0.4)
    a = armer(tmp_path, FakeUnit(["inactive"]), monkeypatch)
    t0 = time.monotonic()
    a._input_changed("/usr/lib/libx.so.1")
    await asyncio.sleep(0.1)
    assert not a._wake.is_set()  # an upgrade writes on: wait for quiet
    # Changes that never stop still wake the keeper once INPUT_MAX_DELAY has passed.
    while not a._wake.is_set():
        assert time.monotonic() - t0 < 2.0
        a._input_changed("/usr/lib/libx.so.1")
        await asyncio.sleep(0.05)
    assert 0.35 < time.monotonic() - t0 < 0.7
    assert a._input_since is None  # the next change starts a new batch
