from __future__ import annotations

import threading
from pathlib import Path

import pytest

from cryptlockd.helper import cgroups
from tests.wait import wait_until


def make_tree(root: Path, paths: list[str]) -> None:
    (root / "cgroup.procs").write_text("")
    # Like cgroupfs: every cgroup below the root has the control files.
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts) + 1):
            d = root.joinpath(*parts[:i])
            d.mkdir(exist_ok=True)
            if not (d / "cgroup.freeze").exists():
                (d / "cgroup.freeze").write_text("0\n")
                (d / "cgroup.events").write_text("populated 1\nfrozen 0\n")


TREE = [
    "init.scope",
    "system.slice/dbus.service",
    "system.slice/cryptlockd.service",
    "user.slice/user-1000.slice/session-2.scope",
    "cryptlockd.slice/cryptlockd-helper.service",
    "cryptlockd.slice/other.service",
    "machine.slice",
]


def test_plan_spares_init_and_own_branch(tmp_path: Path) -> None:
    make_tree(tmp_path, TREE)
    plan = cgroups.plan_freeze(str(tmp_path), "/cryptlockd.slice/cryptlockd-helper.service")
    assert plan == [
        "/cryptlockd.slice/other.service",
        "/machine.slice",
        "/system.slice",
        "/user.slice",
    ]


def test_plan_when_helper_sits_in_system_slice(tmp_path: Path) -> None:
    make_tree(tmp_path, TREE)
    plan = cgroups.plan_freeze(str(tmp_path), "/system.slice/cryptlockd.service")
    assert "/system.slice" not in plan
    assert "/system.slice/dbus.service" in plan and "/init.scope" not in plan


def test_own_cgroup() -> None:
    assert cgroups.own_cgroup("0::/a.slice/b.service\n") == "/a.slice/b.service"
    with pytest.raises(cgroups.FreezeError):
        cgroups.own_cgroup("1:name=systemd:/x\n")


def test_freeze_waits_for_frozen_and_thaws_in_reverse(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a", "b", "c"])
    (tmp_path / "c/cgroup.freeze").write_text("1\n")  # frozen by someone else: left alone
    for name in ("a", "b"):
        (tmp_path / name / "cgroup.events").write_text("populated 1\nfrozen 1\n")
    frozen: list[str] = []
    cgroups.freeze(str(tmp_path), ["/a", "/b", "/c"], 1.0, frozen)
    assert frozen == ["/a", "/b"]
    assert (tmp_path / "a/cgroup.freeze").read_text().strip() == "1"
    assert cgroups.thaw(str(tmp_path), frozen) == []
    assert (tmp_path / "b/cgroup.freeze").read_text().strip() == "0"
    assert (tmp_path / "c/cgroup.freeze").read_text() == "1\n"


def test_freeze_deadline_names_the_laggard_and_keeps_list(tmp_path: Path) -> None:
    make_tree(tmp_path, ["a", "b"])
    (tmp_path / "a/cgroup.events").write_text("frozen 1\n")
    frozen: list[str] = []
    with pytest.raises(cgroups.FreezeError, match="/b"):
        cgroups.freeze(str(tmp_path), ["/a", "/b"], 0.05, frozen)
    assert frozen == ["/a", "/b"]  # the caller still thaws both


def test_plan_refuses_an_invisible_hierarchy(tmp_path: Path) -> None:
    with pytest.raises(cgroups.FreezeError):
        cgroups.plan_freeze(str(tmp_path), "/x.service")


def test_freeze_sees_a_cgroup_that_freezes_late(tmp_path: Path) -> None:
    # /a says `frozen 1` only a while after it was asked to. A regular file never wakes a
    # poll(): this shows the looks every LOOK_AGAIN (the POLLPRI of a real cgroup.events
    # is proven in the guest, where every cycle freezes).
    make_tree(tmp_path, ["a", "b"])
    (tmp_path / "b/cgroup.events").write_text("populated 1\nfrozen 1\n")
    frozen: list[str] = []

    def later() -> None:
        wait_until(lambda: (tmp_path / "a/cgroup.freeze").read_text().strip() == "1", 5.0)
        (tmp_path / "a/cgroup.events").write_text("populated 1\nfrozen 1\n")

    t = threading.Thread(target=later)
    t.start()
    try:
        cgroups.freeze(str(tmp_path), ["/a", "/b"], 5.0, frozen)
    finally:
        t.join()
    assert frozen == ["/a", "/b"]
