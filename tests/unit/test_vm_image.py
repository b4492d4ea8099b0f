"""The QEMU test bed's image cache pruning (tests/vm/image.py), on a fake cache in tmp_path:
no root, no QEMU, no image."""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.vm.image import ensure_image, inputs_hash, prune

CURRENT = "bookworm-1111111111111111"
OLDER = "bookworm-2222222222222222"
IN_USE = "bookworm-3333333333333333"  # older too, but a run holds its lock
TRIXIE = "trixie-4444444444444444"


def dead_pid() -> int:
    """A pid no process can have: above the kernel's limit."""
    return int(Path("/proc/sys/kernel/pid_max").read_text()) + 1


def make_entry(root: Path, name: str) -> None:
    (root / name).mkdir()
    (root / name / "root.img").write_bytes(b"\0" * 512)
    (root / name / "manifest.json").write_text("{}\n")
    (root / f"{name}.lock").touch()


def make_dir(root: Path, name: str) -> str:
    (root / name).mkdir()
    (root / name / "partial").write_text("half a build\n")
    return name


def test_prune_removes_older_entries_dead_builds_and_failed_builds(tmp_path: Path) -> None:
    root = tmp_path
    for name in (CURRENT, OLDER, IN_USE, TRIXIE):
        make_entry(root, name)
    dead_build = make_dir(root, f".build-{OLDER}-{dead_pid()}")
    dead_build_current = make_dir(root, f".build-{CURRENT}-{dead_pid()}")
    live_build = make_dir(root, f".build-{OLDER}-{os.getpid()}")
    failed = make_dir(root, f".failed-{OLDER}")
    trixie_failed = make_dir(root, f".failed-{TRIXIE}")
    orphan = make_dir(root, "bookworm-5555555555555555")  # an entry without its lock file
    shared = ["accel.json", "wheels-py3.11-0123456789ab", "wheels-0123456789ab.lock"]
    (root / shared[0]).write_text("{}\n")
    (root / shared[1]).mkdir()
    (root / shared[2]).touch()

    # A session of an older checkout runs on IN_USE: it holds that entry's lock (shared).
    with (root / f"{IN_USE}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_SH)
        removed = prune(root, "bookworm", CURRENT)

    kept = {
        CURRENT,
        f"{CURRENT}.lock",
        IN_USE,
        f"{IN_USE}.lock",
        TRIXIE,
        f"{TRIXIE}.lock",
        live_build,
        trixie_failed,
        *shared,
    }
    assert {p.name for p in root.iterdir()} == kept
    assert (root / IN_USE / "root.img").exists() and (root / CURRENT / "root.img").exists()
    assert set(removed) >= {OLDER, orphan, dead_build, dead_build_current, failed}
    assert not set(removed) & kept


def test_prune_of_a_clean_cache_removes_nothing(tmp_path: Path) -> None:
    make_entry(tmp_path, CURRENT)
    make_entry(tmp_path, TRIXIE)
    assert prune(tmp_path, "bookworm", CURRENT) == []
    assert prune(tmp_path, "trixie", TRIXIE) == []
    assert {p.name for p in tmp_path.iterdir()} == {
        CURRENT,
        f"{CURRENT}.lock",
        TRIXIE,
        f"{TRIXIE}.lock",
    }


def test_prune_keeps_an_entry_while_its_lock_is_held_and_removes_it_after(tmp_path: Path) -> None:
    make_entry(tmp_path, CURRENT)
    make_entry(tmp_path, OLDER)
    with (tmp_path / f"{OLDER}.lock").open("a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # a builder of the older checkout
        assert OLDER not in prune(tmp_path, "bookworm", CURRENT)
        assert (tmp_path / OLDER / "manifest.json").exists()
    assert OLDER in prune(tmp_path, "bookworm", CURRENT)
    assert not (tmp_path / OLDER).exists() and not (tmp_path / f"{OLDER}.lock").exists()


def test_a_run_holds_its_entry_so_an_older_checkouts_prune_keeps_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CRYPTLOCKD_VM_CACHE", str(tmp_path))
    ours = f"bookworm-{inputs_hash('bookworm')}"
    make_entry(tmp_path, ours)
    manifest = {"suite": "bookworm", "python_version": "3.11", "kernel": "6.1.0-test"}
    (tmp_path / ours / "manifest.json").write_text(json.dumps(manifest))

    image = ensure_image("bookworm")  # cached: no build, no root needed
    assert image.directory == tmp_path / ours and image.kernel == tmp_path / ours / "vmlinuz"
    # A run of another checkout (another hash) prunes: our entry is in use, it stays.
    assert prune(tmp_path, "bookworm", CURRENT) == []
    assert (tmp_path / ours / "root.img").exists()


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting needs root")
def test_prune_unmounts_what_a_killed_mmdebstrap_left_before_removing(tmp_path: Path) -> None:
    """A builder killed inside mmdebstrap leaves its chroot's mounts: rmtree alone would
    descend into them. Run in a private mount namespace, so nothing reaches the host."""
    build = tmp_path / f".build-{OLDER}-{dead_pid()}"
    script = f"""
import subprocess
from pathlib import Path
from tests.vm.image import prune
shm = Path({str(build)!r}) / "rootfs/dev/shm"
shm.mkdir(parents=True)
subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(shm)], check=True)
(shm / "file").write_text("in the chroot's tmpfs")
print(prune(Path({str(tmp_path)!r}), "bookworm", {CURRENT!r}))
print(any(str(shm) in line for line in open("/proc/self/mountinfo")))
"""
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", script],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.split("\n")
    assert out[:2] == [f"['{build.name}']", "False"], out
    assert not build.exists()
