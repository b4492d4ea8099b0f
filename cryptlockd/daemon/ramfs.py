"""The RAM filesystem the helper runs from: a ramfs (never swapped, unlike tmpfs) holding
exactly the helper's closure.

The closure is computed, not listed: the target interpreter imports the helper and loads
libcryptsetup, and reports the module files it loaded and the shared objects mapped in
its address space; `ldd` adds the soname links the dynamic loader looks for. Each build
ends with the helper's self-test, run in a chroot of the new tree. The tree is rebuilt only
when its inputs change (a manifest of path, size and mtime of every input).

A build never touches the tree in use (the "live" tree, where the helper runs): it goes
into a second ramfs, the staging tree, and is swapped in whole (swap_in()) once it passed
its self-test. Until then the live tree, stale or not, is a complete, working copy.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from importlib.util import cache_from_source
from pathlib import Path

import cryptlockd
from cryptlockd.errors import CryptlockdError
from cryptlockd.helper import protocol
from cryptlockd.run import run

log = logging.getLogger(__name__)

DEFAULT_PYTHON = "/usr/bin/python3"
MANIFEST = "manifest.json"
SIZE_TARGET = 48 * 1024 * 1024
# Loaded on demand by glibc (thread unwinding) rather than at start: add if present.
_ON_DEMAND_LIBS = ("/lib/x86_64-linux-gnu/libgcc_s.so.1", "/usr/lib/x86_64-linux-gnu/libgcc_s.so.1")

# Run by the target interpreter as `python3 -I -S -c`; argv[1] is the package's parent.
_CLOSURE_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import runpy
import cryptlockd.helper.main
from cryptlockd.helper.libcryptsetup import Library
from cryptlockd.helper.token import load_tpm2
load_tpm2(Library())
modules = sorted({m.__file__ for m in list(sys.modules.values())
                  if getattr(m, "__file__", None)})
libs = set()
with open("/proc/self/maps") as f:
    for line in f:
        parts = line.split(None, 5)
        if len(parts) == 6 and ".so" in parts[5]:
            libs.add(parts[5].strip())
print(json.dumps({"executable": sys.executable, "modules": modules, "libs": sorted(libs)}))
"""


class RamfsError(CryptlockdError):
    pass


@dataclass
class Closure:
    executable: str
    python_files: list[str] = field(default_factory=list)  # stdlib .py/.pyc/.so
    package_files: list[tuple[str, str]] = field(default_factory=list)  # (source, rel dest)
    library_paths: list[str] = field(default_factory=list)  # as ld.so looks them up


def package_root() -> Path:
    """The directory that holds the cryptlockd package (site-packages or the checkout)."""
    return Path(cryptlockd.__file__).resolve().parent.parent


def compute_closure(python: str = DEFAULT_PYTHON) -> Closure:
    pkg = package_root()
    out = run([python, "-I", "-S", "-c", _CLOSURE_SCRIPT, str(pkg)], timeout=60)
    info = json.loads(out.stdout)
    closure = Closure(executable=python)
    stdlib_files: set[str] = set()
    for f in info["modules"]:
        if f.startswith(str(pkg) + "/"):
            continue
        stdlib_files.add(f)
        if f.endswith(".py"):
            cached = cache_from_source(f)
            if os.path.exists(cached):
                stdlib_files.add(cached)
    closure.python_files = sorted(stdlib_files)
    helper_dir = pkg / "cryptlockd" / "helper"
    stdlib = Path(next(f for f in info["modules"] if f.endswith("/os.py"))).parent
    sources = [pkg / "cryptlockd" / "__init__.py", *sorted(helper_dir.glob("*.py"))]
    closure.package_files = [
        (str(s), str(stdlib / s.relative_to(pkg)).lstrip("/")) for s in sources
    ]
    libs: set[str] = set(info["libs"])
    libs.update(p for p in _ON_DEMAND_LIBS if os.path.exists(p))
    # ldd names each library as the loader finds it (the soname link), which the mapped
    # (resolved) paths do not show.
    for obj in [python, *sorted(libs)]:
        for line in run(["ldd", obj], check=False, timeout=30).stdout.splitlines():
            line = line.strip()
            if "=>" in line:
                target = line.split("=>", 1)[1].split("(")[0].strip()
                if target.startswith("/"):
                    libs.add(target)
            elif line.startswith("/"):
                libs.add(line.split()[0])
    libs.update(_soname_links(libs))
    closure.library_paths = sorted(libs)
    return closure


def _soname_links(paths: set[str]) -> list[str]:
    """libfoo.so.12 -> libfoo.so.12.9.0 links next to each library: ctypes opens
    libcryptsetup by soname, which no ldd line shows."""
    out = []
    for p in paths:
        real = os.path.realpath(p)
        d = os.path.dirname(real)
        stem = os.path.basename(real).split(".so")[0]
        try:
            entries = os.scandir(d)
        except OSError:
            continue
        with entries:
            for e in entries:
                if (
                    e.name.startswith(stem + ".so.")
                    and e.is_symlink()
                    and os.path.realpath(e.path) == real
                ):
                    out.append(e.path)
    return out


def _mirror(root: Path, path: str) -> None:
    """Make `path` resolve under root as on the host: recreate each symlink met on the
    way (/lib64 -> usr/lib64, soname -> file) and copy the final file."""
    parts = [p for p in path.split("/") if p]
    cur = ""
    for i, part in enumerate(parts):
        host = f"{cur}/{part}"
        dest = root / host.lstrip("/")
        rest = "/".join(parts[i + 1 :])
        if os.path.islink(host):
            target = os.readlink(host)
            if not os.path.lexists(dest):
                dest.parent.mkdir(parents=True, exist_ok=True)
                os.symlink(target, dest)
            resolved = os.path.normpath(
                target if target.startswith("/") else os.path.join(cur or "/", target)
            )
            _mirror(root, resolved + (f"/{rest}" if rest else ""))
            return
        if not rest:
            if not dest.exists():
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(host, dest)
            return
        cur = host


def manifest_of(closure: Closure) -> dict[str, object]:
    inputs = sorted(
        {
            closure.executable,
            *closure.python_files,
            *closure.library_paths,
            *(s for s, _ in closure.package_files),
        }
    )
    stamps = []
    for p in inputs:
        st = os.stat(p)
        stamps.append([p, st.st_size, st.st_mtime_ns])
    digest = hashlib.sha256(json.dumps(stamps).encode()).hexdigest()
    return {"digest": digest, "inputs": stamps, "closure": closure.__dict__}


def inputs_unchanged(manifest: dict[str, object]) -> bool:
    stamps = manifest.get("inputs")
    if not isinstance(stamps, list):
        return False
    for path, size, mtime in stamps:
        try:
            st = os.stat(path)
        except OSError:
            return False
        if st.st_size != size or st.st_mtime_ns != mtime:
            return False
    return True


def populate(root: Path, closure: Closure) -> None:
    for d in protocol.RAMFS_DIRS:
        (root / d).mkdir(parents=True, exist_ok=True)
    _mirror(root, closure.executable)
    for f in closure.python_files:
        _mirror(root, f)
    for path in closure.library_paths:
        _mirror(root, path)
    for src, rel in closure.package_files:
        dest = root / rel
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, dest)
    # Byte-compile the helper with the target interpreter so the helper starts fast and
    # never writes into its tree.
    pkg_dirs = sorted({str((root / rel).parent) for _, rel in closure.package_files})
    run([closure.executable, "-I", "-S", "-m", "compileall", "-q", *pkg_dirs], timeout=120)


def tree_size(root: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = os.path.join(dirpath, f)
            if not os.path.islink(p):
                total += os.lstat(p).st_size
    return total


def self_test(root: Path, python: str = DEFAULT_PYTHON) -> dict[str, object]:
    """Runs the helper's self-test inside the tree; the error names what is missing."""
    proc = run(
        ["chroot", str(root), python, "-I", "-S", "-B", "-m", "cryptlockd.helper", "--self-test"],
        check=False,
        timeout=120,
    )
    if proc.returncode != 0:
        lines = (proc.stderr or proc.stdout).strip().splitlines()
        raise RamfsError(
            f"the helper's self-test failed in {root}: "
            f"{lines[-1] if lines else f'exit status {proc.returncode}'}"
        )
    result = json.loads(proc.stdout)
    if not isinstance(result, dict) or not result.get("ok"):
        raise RamfsError(f"the helper's self-test failed in {root}: {proc.stdout.strip()}")
    return result


def watch_targets(manifest: dict[str, object]) -> dict[str, set[str]]:
    """What to watch for a manifest's inputs: directory -> names. Each input by the path
    it was found at and by the path it resolves to (/usr/bin/python3 -> python3.11,
    libfoo.so.12 -> libfoo.so.12.9.0), since an upgrade may replace either."""
    stamps = manifest.get("inputs")
    targets: dict[str, set[str]] = {}
    if not isinstance(stamps, list):
        return targets
    for stamp in stamps:
        path = str(stamp[0])
        for p in {path, os.path.realpath(path)}:
            targets.setdefault(os.path.dirname(p), set()).add(os.path.basename(p))
    return targets


def _is_mountpoint(path: Path) -> bool:
    try:
        with open("/proc/self/mountinfo") as f:
            return any(line.split()[4] == str(path) for line in f)
    except OSError:
        return False


def _read_manifest(root: Path) -> dict[str, object] | None:
    try:
        data = json.loads((root / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


class Ramfs:
    """Owns the helper's RAM filesystem at `path` (default /run/cryptlockd/ramfs, the live
    tree) and its staging tree next to it (`<path>.next`)."""

    def __init__(
        self, path: str = protocol.RAMFS_DIR, python: str = DEFAULT_PYTHON, mount: bool = True
    ) -> None:
        self.path = Path(path)
        self.staging = Path(f"{path}.next")
        self.python = python
        self.mount = mount
        self.size = 0
        self.digest = ""

    def manifest(self) -> dict[str, object] | None:
        """The live tree's manifest; None when there is no live tree."""
        if self.mount and not _is_mountpoint(self.path):
            return None
        return _read_manifest(self.path)

    def live(self) -> bool:
        """A built and self-tested tree is in place (current or not)."""
        return self.manifest() is not None

    def load(self) -> bool:
        """Takes size and digest from the live tree; False when there is none."""
        manifest = self.manifest()
        if manifest is None:
            self.size, self.digest = 0, ""
            return False
        self.digest = str(manifest.get("digest", ""))
        self.size = int(str(manifest.get("size", 0)))
        return True

    def current(self) -> bool:
        """Cheap: the live tree exists and none of its inputs changed (stat only)."""
        manifest = self.manifest()
        return manifest is not None and inputs_unchanged(manifest)

    def staged_current(self) -> bool:
        """A staged tree waits to be swapped in, and none of its inputs changed since."""
        manifest = _read_manifest(self.staging)
        if manifest is None or (self.mount and not _is_mountpoint(self.staging)):
            return False
        return inputs_unchanged(manifest)

    def stage(self) -> dict[str, object]:
        """Builds and self-tests a fresh tree in the staging place; returns its manifest.
        The live tree is not touched."""
        closure = compute_closure(self.python)
        manifest = manifest_of(closure)
        self._fresh_tree(self.staging)
        populate(self.staging, closure)
        manifest["size"] = size = tree_size(self.staging)
        manifest["self_test"] = self_test(self.staging, self.python)
        (self.staging / MANIFEST).write_text(json.dumps(manifest))
        level = logging.INFO if size <= SIZE_TARGET else logging.WARNING
        log.log(
            level,
            "helper RAM filesystem built at %s: %.1f MiB (target %d MiB)",
            self.staging,
            size / 2**20,
            SIZE_TARGET // 2**20,
        )
        return manifest

    def swap_in(self) -> None:
        """The staged tree becomes the live one, the old live tree goes. Only while no helper
        runs from the live tree (the caller's rule)."""
        if _read_manifest(self.staging) is None:
            raise RamfsError(f"no staged tree at {self.staging}")
        try:
            self._swap_in()
        finally:
            self.load()  # whatever is live now, if anything

    def _swap_in(self) -> None:
        if self.mount:
            while _is_mountpoint(self.path):
                run(["umount", "--lazy", str(self.path)])
            self.path.mkdir(parents=True, exist_ok=True, mode=0o700)
            # Not `mount --move`: the kernel refuses to move a mount whose parent is shared,
            # and systemd mounts /run shared. A bind keeps the same ramfs alive at `path`.
            run(["mount", "--bind", str(self.staging), str(self.path)])
            while _is_mountpoint(self.staging):
                run(["umount", "--lazy", str(self.staging)])
        else:
            old = self.path.with_name(self.path.name + ".old")
            if old.exists():
                shutil.rmtree(old)
            if self.path.exists():
                self.path.rename(old)
            self.staging.rename(self.path)
            if old.exists():
                shutil.rmtree(old)

    def build(self) -> None:
        """Stage and swap in at once: for a caller that knows no helper runs."""
        self.stage()
        self.swap_in()

    def _fresh_tree(self, root: Path) -> None:
        if self.mount:
            while _is_mountpoint(root):
                run(["umount", "--lazy", str(root)])
            root.mkdir(parents=True, exist_ok=True, mode=0o700)
            run(["mount", "-t", "ramfs", "-o", "mode=0755", "cryptlockd-helper", str(root)])
        else:
            if root.exists():
                shutil.rmtree(root)
            root.mkdir(parents=True, mode=0o755)
