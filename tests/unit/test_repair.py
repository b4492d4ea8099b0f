"""The repair at start (cryptlockd/daemon/repair.py): what a crashed cycle left behind."""

from __future__ import annotations

import json
from pathlib import Path

from cryptlockd.daemon.repair import repair, take_recovered_record


def test_repair_thaws_and_restores(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    for name in ("system.slice", "user.slice"):
        (cg / name).mkdir(parents=True)
        (cg / name / "cgroup.freeze").write_text("1")
    state = tmp_path / "ramfs" / "state"
    state.mkdir(parents=True)
    (state / "frozen").write_text("/system.slice\n/user.slice\n")
    (state / "sync_on_suspend").write_text("1\n")
    (state / "rcu_expedited").write_text("0\n")
    sync = tmp_path / "sync_on_suspend"
    sync.write_text("0")
    rcu = tmp_path / "rcu_expedited"
    rcu.write_text("1")
    args = (tmp_path / "ramfs", str(tmp_path / "no.sock"), str(cg), str(sync), str(rcu))
    done = repair(*args)
    assert done[1:] == ["sync_on_suspend=1", "rcu_expedited=0"]
    assert (cg / "user.slice/cgroup.freeze").read_text() == "0"
    assert sync.read_text() == "1" and not (state / "frozen").exists()
    assert rcu.read_text() == "0" and not (state / "rcu_expedited").exists()
    assert repair(*args) == []


def test_repair_leaves_a_knob_the_cycle_never_changed(tmp_path: Path) -> None:
    # Died after saving rcu_expedited and before setting it: nothing to write.
    state = tmp_path / "ramfs" / "state"
    state.mkdir(parents=True)
    (state / "rcu_expedited").write_text("0\n")
    rcu = tmp_path / "rcu_expedited"
    rcu.write_text("0")
    cg, sync = str(tmp_path / "cg"), str(tmp_path / "sync")
    assert repair(tmp_path / "ramfs", str(tmp_path / "no.sock"), cg, sync, str(rcu)) == []
    assert not (state / "rcu_expedited").exists()


def test_the_record_of_a_recovered_cycle_is_taken_once(tmp_path: Path) -> None:
    state = tmp_path / "ramfs" / "state"
    state.mkdir(parents=True)
    reason = "the helper died mid-cycle (killed by SIGKILL); recovered"
    (state / "recovered.json").write_text(json.dumps({"reason": reason, "success": False}))
    record = take_recovered_record(tmp_path / "ramfs")
    assert record is not None and record["reason"] == reason
    assert record["recovered"] and not record["success"] and record["result"] == "failed"
    assert take_recovered_record(tmp_path / "ramfs") is None


def test_an_unreadable_recovered_record_is_still_a_failed_cycle(tmp_path: Path) -> None:
    state = tmp_path / "ramfs" / "state"
    state.mkdir(parents=True)
    (state / "recovered.json").write_text("{half")
    record = take_recovered_record(tmp_path / "ramfs")
    assert record is not None and not record["success"]
    assert record["reason"].startswith("the helper died mid-cycle; recovered (record unreadable")
