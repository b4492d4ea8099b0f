"""The helper's RAM filesystem closure, built into a plain directory on the host and
self-tested there in a chroot (the daemon mounts a ramfs at the same place in the guest)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from cryptlockd.daemon import ramfs

needs = pytest.mark.skipif(
    os.geteuid() != 0 or shutil.which("chroot") is None or not os.path.exists(ramfs.DEFAULT_PYTHON),
    reason="needs root, chroot(8) and /usr/bin/python3 to self-test a tree",
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> ramfs.Ramfs:
    fs = ramfs.Ramfs(str(tmp_path_factory.mktemp("ramfs") / "tree"), mount=False)
    try:
        fs.build()
    except ramfs.RamfsError as e:
        if "libcryptsetup" in str(e) and not Path("/usr/lib/x86_64-linux-gnu").glob(
            "libcryptsetup.so.12*"
        ):
            pytest.skip("libcryptsetup12 is not installed on this host")
        raise
    return fs


@needs
def test_build_self_test_and_size(built: ramfs.Ramfs) -> None:
    assert 0 < built.size <= ramfs.SIZE_TARGET
    root = built.path
    assert (root / "usr/lib/python3.11/cryptlockd/helper/main.py").exists() or any(
        root.glob("usr/lib/python3*/cryptlockd/helper/main.py")
    )
    # The closure is small: no third-party package and no daemon module got in.
    assert not list(root.rglob("pydantic*")) and not list(root.rglob("dbus_fast*"))
    assert not list(root.rglob("cryptlockd/daemon"))
    assert list(root.rglob("libcryptsetup.so.12"))


@needs
def test_unchanged_inputs_mean_no_rebuild(built: ramfs.Ramfs) -> None:
    assert built.live() and built.current()
    assert built.load() and built.size > 0 and built.digest
    # Nothing is left in the staging place once the tree is in.
    assert not built.staging.exists()


@needs
def test_missing_library_is_named(built: ramfs.Ramfs, tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(built.path, broken, symlinks=True)
    for lib in broken.rglob("libcryptsetup.so.12*"):
        lib.unlink()
    with pytest.raises(ramfs.RamfsError, match=r"libcryptsetup\.so\.12"):
        ramfs.self_test(broken)


def test_manifest_notices_a_changed_input(tmp_path: Path) -> None:
    f = tmp_path / "input"
    f.write_text("one")
    closure = ramfs.Closure(executable=str(f))
    manifest = ramfs.manifest_of(closure)
    assert ramfs.inputs_unchanged(manifest)
    f.write_text("longer now")
    assert not ramfs.inputs_unchanged(manifest)


def test_mirror_recreates_symlinks(tmp_path: Path) -> None:
    host = tmp_path / "host"
    (host / "usr/lib").mkdir(parents=True)
    (host / "usr/lib/libx.so.1.2").write_text("elf")
    os.symlink("libx.so.1.2", host / "usr/lib/libx.so.1")
    os.symlink("usr/lib", host / "lib")
    root = tmp_path / "root"
    root.mkdir()
    ramfs._mirror(root, str(host / "lib/libx.so.1"))
    inner = root / str(host).lstrip("/")
    assert (inner / "lib").is_symlink() and (inner / "usr/lib/libx.so.1").is_symlink()
    assert (inner / "usr/lib/libx.so.1.2").read_text() == "elf"


def test_a_staged_tree_is_swapped_in_whole(tmp_path: Path) -> None:
    fs = ramfs.Ramfs(str(tmp_path / "ramfs"), mount=False)
    (tmp_path / "ramfs").mkdir()
    (tmp_path / "ramfs" / "old-only").write_text("old")
    assert not fs.live() and not fs.load()
    with pytest.raises(ramfs.RamfsError, match="no staged tree"):
        fs.swap_in()
    fs.staging.mkdir()
    (fs.staging / ramfs.MANIFEST).write_text('{"digest": "abc", "size": 7, "inputs": []}')
    assert fs.staged_current()
    fs.swap_in()
    assert fs.live() and fs.current() and (fs.size, fs.digest) == (7, "abc")
    assert not (tmp_path / "ramfs" / "old-only").exists()
    assert not fs.staging.exists() and not (tmp_path / "ramfs.old").exists()
    assert not fs.staged_current()


def test_watch_targets_name_each_input_and_where_it_leads(tmp_path: Path) -> None:
    (tmp_path / "lib").mkdir()
    (tmp_path / "lib" / "libx.so.1.2").write_text("elf")
    os.symlink("libx.so.1.2", tmp_path / "lib" / "libx.so.1")
    (tmp_path / "bin").mkdir()
    os.symlink("../lib/libx.so.1", tmp_path / "bin" / "python3")
    manifest: dict[str, object] = {
        "inputs": [
            [str(tmp_path / "lib" / "libx.so.1"), 3, 0],
            [str(tmp_path / "bin/python3"), 3, 0],
        ]
    }
    assert ramfs.watch_targets(manifest) == {
        str(tmp_path / "lib"): {"libx.so.1", "libx.so.1.2"},
        str(tmp_path / "bin"): {"python3"},
    }
    assert ramfs.watch_targets({}) == {}
