"""The repair at start (cryptlockd/daemon/repair.py): what a crashed cycle left behind."""

from __future__ import annotations

from pathlib import Path

from cryptlockd.daemon.repair import repair


def test_repair_thaws_and_restores(tmp_path: Path) -> None:
    cg = tmp_path / "cg"
    for name in ("system.slice", "user.slice"):
        (cg / name).mkdir(parents=True)
        (cg / name / "cgroup.freeze").write_text("1")
    state = tmp_path / "ramfs" / "state"
    state.mkdir(parents=True)
    (state / "frozen").write_text("/system.slice\n/user.slice\n")
    (state / "sync_on_suspend").write_text("1\n")
    sync = tmp_path / "sync_on_suspend"
    sync.write_text("0")
    done = repair(tmp_path / "ramfs", str(tmp_path / "no.sock"), str(cg), str(sync))
    assert len(done) == 2
    assert (cg / "user.slice/cgroup.freeze").read_text() == "0"
    assert sync.read_text() == "1" and not (state / "frozen").exists()
    assert repair(tmp_path / "ramfs", str(tmp_path / "no.sock"), str(cg), str(sync)) == []
