"""The keyslots remembered across restarts and reboots (cryptlockd/daemon/keyslot_memory.py).

The file, its parsing and the mapping between dm names (the helper's) and LUKS UUIDs (the
file's); then the daemon's armer: a record's keyslot is saved, and a daemon started
afterwards sends it in its first arm."""

from __future__ import annotations

import asyncio
import logging
import stat
from pathlib import Path

import pytest

from cryptlockd.daemon import helper_armer, keyslot_memory
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.daemon.keyslot_memory import KeyslotMemory, hints, learned, parse, render
from tests.unit.test_helper_armer import FakeUnit, ScriptedHelper, armer

ROOT_UUID = "733dff84-3a03-42a5-870f-27de21a648b7"
DATA_UUID = "0c8a4d52-6b1e-4f0e-9d55-5a0b7c1e2f3a"


def device(name: str, uuid: str) -> LuksDevice:
    return LuksDevice(name, uuid, "LUKS2", "/dev/vda", name == "root", False, "passphrase")


def test_the_file_round_trips_and_keeps_only_keyslots() -> None:
    assert parse(render({ROOT_UUID: 2, DATA_UUID: 0})) == {ROOT_UUID: 2, DATA_UUID: 0}
    text = '{"keyslots": {"a": 1, "b": -1, "c": 32, "d": "3", "e": true, "f": 31}}'
    assert parse(text) == {"a": 1, "f": 31}


@pytest.mark.parametrize("text", ["", "[]", '{"slots": {}}', '{"keyslots": [1]}', "{"])
def test_a_file_that_is_not_ours_is_an_error(text: str) -> None:
    with pytest.raises(ValueError):
        parse(text)


def test_the_helper_gets_the_hints_by_name_and_the_record_is_learned_by_uuid() -> None:
    devices = [device("root", ROOT_UUID), device("data", DATA_UUID)]
    assert hints({ROOT_UUID: 2, "gone": 1}, devices) == {"root": 2}
    uuids = {d.name: d.uuid for d in devices}
    # A name reused for another disk gets the new disk's entry; the old one stays.
    assert learned({ROOT_UUID: 2, "gone": 1}, uuids, {"root": 1, "data": 0}) == {
        ROOT_UUID: 1,
        DATA_UUID: 0,
        "gone": 1,
    }
    # Names not armed, and values that are not keyslots, change nothing.
    assert learned({ROOT_UUID: 2}, uuids, {"swap": 1, "data": -1, "root": "x"}) == {ROOT_UUID: 2}
    assert learned({ROOT_UUID: 2}, uuids, None) == {ROOT_UUID: 2}


def test_the_state_directory_is_systemds_or_the_conventional_one() -> None:
    assert keyslot_memory.state_directory({}) == Path("/var/lib/cryptlockd")
    env = {"STATE_DIRECTORY": "/var/lib/x:/var/lib/y"}
    assert keyslot_memory.state_directory(env) == Path("/var/lib/x")


def test_saved_keyslots_are_root_only_and_loaded_again(tmp_path: Path) -> None:
    memory = KeyslotMemory(tmp_path / "state")
    memory.load()
    assert memory.slots == {}  # no file yet: nothing remembered
    memory.save({ROOT_UUID: 2})
    path = tmp_path / "state" / "keyslots.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    memory.save({ROOT_UUID: 1})
    again = KeyslotMemory(tmp_path / "state")
    again.load()
    assert again.slots == {ROOT_UUID: 1}
    assert [p.name for p in path.parent.iterdir()] == ["keyslots.json"]  # no temp file left


def test_a_damaged_file_is_a_warning_and_nothing_remembered(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "keyslots.json").write_text('{"keyslots": ')
    memory = KeyslotMemory(tmp_path)
    with caplog.at_level(logging.WARNING):
        memory.load()
    assert memory.slots == {}
    assert "tried in order" in caplog.text


def test_a_save_that_fails_is_a_warning_not_an_error(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    (tmp_path / "file").write_text("")
    memory = KeyslotMemory(tmp_path / "file" / "state")  # its parent is a file
    with caplog.at_level(logging.WARNING):
        memory.save({ROOT_UUID: 2})
    assert "cannot save the keyslots" in caplog.text


@pytest.mark.asyncio
async def test_a_restarted_daemon_sends_the_keyslot_its_last_cycle_learned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(helper_armer, "choose_sleep_state", lambda: ("mem", None))
    devices = [device("root", ROOT_UUID), device("data", DATA_UUID)]
    state = tmp_path / "state"

    async def one_cycle(keyslots: dict[str, int]) -> dict[str, object]:
        """An arm and its record (the helper says `keyslots`); the arm message."""
        (tmp_path / "s").unlink(missing_ok=True)
        helper = ScriptedHelper(
            str(tmp_path / "s"), arm_delay=0.0, busy=True, record={"keyslots": keyslots}
        )
        await helper.start()
        a = armer(tmp_path, FakeUnit(["inactive"]), monkeypatch, alive=True)
        a.keyslots = KeyslotMemory(state)  # as main.py gives it, loaded at start
        a.keyslots.load()
        a.ramfs.size = 1
        a.keeper.tree_ready.set()
        got: list[bool] = []
        await a.arm(devices, lambda ok, rec: got.append(ok))
        helper.send_record.set()
        assert a._reader_task is not None
        await asyncio.wait_for(a._reader_task, 5)
        await asyncio.gather(*a._saving)
        helper.close()
        assert got == [True]
        [arm] = helper.arms
        return arm

    first = await one_cycle({"root": 2})
    assert first["keyslots"] == {}  # nothing remembered yet
    assert parse((state / "keyslots.json").read_text()) == {ROOT_UUID: 2}
    second = await one_cycle({"root": 2, "data": 1})
    assert second["keyslots"] == {"root": 2}
    third = await one_cycle({"root": 2, "data": 1})
    assert third["keyslots"] == {"root": 2, "data": 1}
