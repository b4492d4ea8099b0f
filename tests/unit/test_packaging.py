"""The packaging recipes (packaging/README.md), checked without their distributions' tools
where Debian has none.

- Every recipe carries the version of `cryptlockd.__version__`.
- Debian (built and linted by `make deb`, installed in tests/vm/test_package.py): the
  dist-info that debian/write_dist_info.py writes carries pyproject's dependencies, and
  debian/py3dist-overrides maps each to a Debian package.
- restart-when-idle, which the three recipes run after an upgrade, restarts the daemon only
  when its State is "idle", under a logind block lock on sleep (fake busctl, systemctl,
  systemd-inhibit in a private mount namespace).
- Arch (namcap is not in Debian): `bash -n`, the depends against pyproject.toml, and
  package() run for real with its Python steps stubbed: its files are SPEC 3's at Arch's
  paths, the backup= entries among them.
- RPM: rpmlint (Debian packages it) on the spec, and its %install run with its Python steps
  left out: every file it installs is in %files, and every %files entry matches a file.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from types import ModuleType

import pytest

from cryptlockd import __version__

REPO = Path(__file__).resolve().parents[2]
PACKAGING = REPO / "packaging"
DEBIAN = PACKAGING / "debian"
PKGBUILD = PACKAGING / "arch/PKGBUILD"
SPEC = PACKAGING / "rpm/cryptlockd.spec"
RESTART = PACKAGING / "restart-when-idle"
PROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]


def dependency_names() -> list[str]:
    return [re.split(r"[<>=!~ \[;]", d, maxsplit=1)[0] for d in PROJECT["dependencies"]]


def write_dist_info() -> ModuleType:
    spec = importlib.util.spec_from_file_location("write_dist_info", DEBIAN / "write_dist_info.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# -- every recipe, one version -----------------------------------------------------------


def test_every_recipe_carries_the_package_version() -> None:
    changelog = (DEBIAN / "changelog").read_text().splitlines()[0]
    assert re.match(rf"cryptlockd \({re.escape(__version__)}\) ", changelog), changelog
    assert f"\npkgver={__version__}\n" in PKGBUILD.read_text()
    assert re.search(rf"^Version:\s+{re.escape(__version__)}$", SPEC.read_text(), re.M)
    assert f"- {__version__}-1\n" in SPEC.read_text()


# -- Debian ------------------------------------------------------------------------------


def test_dist_info_carries_pyproject_dependencies(tmp_path: Path) -> None:
    module = write_dist_info()
    assert module.package_version((REPO / "cryptlockd/__init__.py").read_text()) == __version__
    module.main(REPO, tmp_path)
    metadata = (tmp_path / f"cryptlockd-{__version__}.dist-info/METADATA").read_text()
    requires = [line.split(": ", 1)[1] for line in metadata.splitlines() if "Requires-Dist" in line]
    assert requires == PROJECT["dependencies"]
    assert f"License-Expression: {PROJECT['license']}\n" in metadata
    assert f"Version: {__version__}\n" in metadata


def test_dist_info_refuses_a_module_without_version() -> None:
    with pytest.raises(ValueError, match="__version__"):
        write_dist_info().package_version("VERSION = '1'\n")


def test_every_dependency_maps_to_a_debian_package() -> None:
    overrides = {
        line.split()[0]: line.split()[1].rstrip(";")
        for line in (DEBIAN / "py3dist-overrides").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    # dh_python3's names: lower case, runs of other characters as "_".
    wanted = {re.sub(r"[^A-Za-z0-9.]+", "_", name).lower() for name in dependency_names()}
    assert set(overrides) == wanted
    assert all(pkg.startswith("python3-") for pkg in overrides.values())


# -- restart-when-idle ---------------------------------------------------------------------

FAKES = {
    # Answers the States listed in $FAKE/states, one per call, then the last one for good.
    "busctl": """
state=$(head -n1 "$FAKE/states")
[ "$(wc -l < "$FAKE/states")" -gt 1 ] && sed -i 1d "$FAKE/states"
echo "busctl $*" >> "$FAKE/log"
echo "s \\"$state\\""
""",
    "systemctl": """
echo "systemctl $*" >> "$FAKE/log"
[ "$1" != is-active ] || [ ! -e "$FAKE/stopped" ]
""",
    "systemd-inhibit": """
echo "systemd-inhibit $*" >> "$FAKE/log"
while [ "${1#--}" != "$1" ]; do shift; done
exec "$@"
""",
    "deb-systemd-invoke": 'echo "deb-systemd-invoke $*" >> "$FAKE/log"\n',
    "sleep": 'echo "sleep $*" >> "$FAKE/log"\n',
}


def run_restart(tmp_path: Path, states: list[str], *args: str, debian: bool = True) -> str:
    """Runs restart-when-idle with the fakes first on PATH, in a mount namespace where
    /run/systemd/system exists (as on a machine booted with systemd); returns the log."""
    unshare, mount, mkdir = (shutil.which(t) for t in ("unshare", "mount", "mkdir"))
    if unshare is None or mount is None or mkdir is None:
        pytest.skip("unshare, mount or mkdir (util-linux, coreutils) is not installed")
    fake = tmp_path / "fake"
    (fake / "bin").mkdir(parents=True)
    for name, body in FAKES.items():
        if name == "deb-systemd-invoke" and not debian:
            continue
        (fake / "bin" / name).write_text("#!/bin/sh\n" + body)
        (fake / "bin" / name).chmod(0o755)
    (fake / "states").write_text("".join(f"{s}\n" for s in states))
    (fake / "log").write_text("")
    # Only the tools the script and the fakes use, so that the host's own
    # deb-systemd-invoke does not stand in for a missing one.
    tools = fake / "tools"
    tools.mkdir()
    for tool in ("head", "wc", "sed", "date", "sh"):
        found = shutil.which(tool)
        assert found is not None, tool
        (tools / tool).symlink_to(found)
    # The tmpfs goes on /run, so that nothing is created on the host's /run/systemd.
    script = f'{mount} -t tmpfs tmpfs /run || exit 99; {mkdir} -p /run/systemd/system; exec "$@"'
    proc = subprocess.run(
        [unshare, "-m", "/bin/sh", "-c", script, "sh", "/bin/sh", str(RESTART), *args],
        env={"PATH": f"{fake / 'bin'}:{tools}", "FAKE": str(fake)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    if proc.returncode == 99 or "unshare failed" in proc.stderr:  # not allowed here
        pytest.skip(f"no private mount namespace here: {proc.stderr.strip()}")
    assert proc.returncode == 0, proc.stderr
    return (fake / "log").read_text() + proc.stderr


def test_restart_when_idle_restarts_an_idle_daemon_under_a_sleep_lock(tmp_path: Path) -> None:
    log = run_restart(tmp_path, ["idle"]).splitlines()
    assert log[0] == "systemctl is-active --quiet cryptlockd.service"
    assert log[1].startswith("systemd-inhibit --what=sleep --mode=block ")
    assert log[-1] == "deb-systemd-invoke restart cryptlockd.service"
    assert [line for line in log if " restart " in line] == [log[-1]]


def test_restart_when_idle_waits_for_the_cycle_to_end(tmp_path: Path) -> None:
    log = run_restart(tmp_path, ["arming", "armed", "armed", "idle"]).splitlines()
    states = [line for line in log if line.startswith("busctl")]
    assert len(states) == 4
    assert log.count("sleep 1") == 3
    # Restarted after the last State read, never before it.
    assert log[-1] == "deb-systemd-invoke restart cryptlockd.service"
    assert log.index(states[-1]) < len(log) - 1


def test_restart_when_idle_leaves_a_daemon_that_stays_armed(tmp_path: Path) -> None:
    out = run_restart(tmp_path, ["armed"], "0")
    assert [line for line in out.splitlines() if line.endswith(" restart cryptlockd.service")] == []
    assert "not restarted, a sleep cycle is under way" in out


def test_restart_when_idle_leaves_a_stopped_daemon_alone(tmp_path: Path) -> None:
    (tmp_path / "fake").mkdir()
    (tmp_path / "fake/stopped").touch()
    log = run_restart(tmp_path, ["idle"]).splitlines()
    assert log == ["systemctl is-active --quiet cryptlockd.service"]


def test_restart_when_idle_uses_systemctl_off_debian(tmp_path: Path) -> None:
    log = run_restart(tmp_path, ["idle"], debian=False).splitlines()
    assert log[-1] == "systemctl restart cryptlockd.service"


# -- Arch ----------------------------------------------------------------------------------

ARCH_NAMES = {
    "dbus-fast": "python-dbus-fast",
    "systemd-python": "python-systemd",
    "pyudev": "python-pyudev",
    "pydantic": "python-pydantic",
    "prometheus-client": "python-prometheus_client",
}
# SPEC 3's installed files and the rest of `make install-files`, at /usr.
PACKAGE_FILES = [
    "usr/bin/cryptlockd",
    "usr/bin/cryptlockctl",
    "usr/lib/systemd/system/cryptlockd.service",
    "usr/lib/systemd/system/cryptlockd-helper.service",
    "usr/lib/systemd/system/systemd-suspend.service.d/cryptlockd.conf",
    "usr/share/dbus-1/system.d/org.cryptlockd1.conf",
    "usr/share/dbus-1/system-services/org.cryptlockd1.service",
    "usr/share/dbus-1/interfaces/org.cryptlockd1.Manager.xml",
    "usr/share/polkit-1/actions/org.cryptlockd1.policy",
    "usr/share/man/man1/cryptlockctl.1",
    "usr/share/man/man5/cryptlockd.conf.5",
    "usr/share/man/man5/org.cryptlockd1.5",
    "usr/share/man/man8/cryptlockd.8",
    "usr/share/bash-completion/completions/cryptlockctl",
    "usr/share/zsh/site-functions/_cryptlockctl",
    "etc/cryptlockd/cryptlockd.conf",
]


def bash(script: str, cwd: Path = REPO) -> str:
    proc = subprocess.run(
        ["bash", "-euc", script], capture_output=True, text=True, timeout=120, cwd=cwd
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def test_pkgbuild_parses_and_depends_on_every_dependency() -> None:
    bash(f"bash -n {PKGBUILD} && bash -n {PKGBUILD.parent / 'cryptlockd.install'}")
    out = bash(f"source {PKGBUILD}; printf '%s\\n' \"${{depends[@]}}\"")
    depends = out.split()
    assert [
        ARCH_NAMES[name] for name in dependency_names() if ARCH_NAMES[name] not in depends
    ] == []
    assert {"python", "cryptsetup", "systemd", "polkit", "dbus"} <= set(depends)


def assert_native_sleep_entry(root: Path, path: str) -> None:
    """Packages build the C sleep entry (SLEEP_ENTRY=native), and the drop-in runs it."""
    entry = root / path.lstrip("/")
    assert entry.read_bytes()[:4] == b"\x7fELF" and os.access(entry, os.X_OK)
    dropin = root / "usr/lib/systemd/system/systemd-suspend.service.d/cryptlockd.conf"
    assert f"\nExecStart={path}\n" in dropin.read_text()


def installed_files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() or p.is_symlink()}


def test_pkgbuild_package_installs_every_file(tmp_path: Path) -> None:
    srcdir, pkgdir = tmp_path / "src", tmp_path / "pkg"
    srcdir.mkdir()
    (srcdir / f"cryptlockd-{__version__}").symlink_to(REPO)
    # python -m installer needs the wheel build() makes: stubbed, it only says it ran.
    out = bash(
        f'source {PKGBUILD}; python() {{ echo "python $*"; }}; '
        f"srcdir={srcdir} pkgdir={pkgdir}; cd $srcdir; package",
        cwd=tmp_path,
    )
    assert f"python -m installer --destdir={pkgdir} dist/" in out
    files = installed_files(pkgdir)
    assert [f for f in PACKAGE_FILES if f not in files] == []
    assert "usr/lib/cryptlockd/restart-when-idle" in files
    assert_native_sleep_entry(pkgdir, "/usr/lib/cryptlockd/cryptlockd-sleep")
    backup = bash(f"source {PKGBUILD}; printf '%s\\n' \"${{backup[@]}}\"").split()
    assert backup and all(b in files for b in backup)
    assert (
        'exec /usr/bin/python -I -m cryptlockd.cli "$@"'
        in (pkgdir / "usr/bin/cryptlockctl").read_text()
    )


# -- RPM -----------------------------------------------------------------------------------

# What Fedora's macros expand to (rpm --eval on Fedora); Debian's rpm lacks several.
FEDORA_MACROS = {
    "_prefix": "/usr",
    "_bindir": "/usr/bin",
    "_datadir": "/usr/share",
    "_mandir": "/usr/share/man",
    "_sysconfdir": "/etc",
    "_libexecdir": "/usr/libexec",
    "_unitdir": "/usr/lib/systemd/system",
    "_userunitdir": "/usr/lib/systemd/user",
    "python3": "/usr/bin/python3",
    "make_build": "make",
}


def expand(text: str, macros: dict[str, str]) -> str:
    return re.sub(r"%\{?(\w+)\}?", lambda m: macros.get(m.group(1), m.group(0)), text)


def spec_section(name: str) -> list[str]:
    """The lines of a spec section (%install, %files ...) up to the next section."""
    lines = SPEC.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(name))
    out = []
    for line in lines[start + 1 :]:
        if re.match(r"^%(post|pre|files|changelog|check|description|prep|build)\b", line):
            break
        out.append(line)
    return out


def test_spec_passes_rpmlint() -> None:
    if shutil.which("rpmlint") is None:
        pytest.skip("rpmlint is not installed (make deps installs it)")
    proc = subprocess.run(
        ["rpmlint", "-r", str(SPEC.with_name("cryptlockd.rpmlintrc")), str(SPEC)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "0 errors, 0 warnings" in proc.stdout, proc.stdout


def test_spec_files_cover_every_installed_file(tmp_path: Path) -> None:
    buildroot = tmp_path / "buildroot"
    macros = {**FEDORA_MACROS, "buildroot": str(buildroot)}
    # %install without its %pyproject_* steps (the wheel), run as rpmbuild would.
    steps = [
        expand(line, macros)
        for line in spec_section("%install")
        if line.strip() and not line.startswith(("#", "%pyproject_"))
    ]
    assert steps and not [s for s in steps if "%" in s], steps
    bash("\n".join(steps))
    files = installed_files(buildroot)
    assert [f for f in PACKAGE_FILES if f not in files] == []
    entries = []
    for line in spec_section("%files"):
        if not line.strip() or line.startswith(("#", "%doc", "%license")):
            continue
        directory = line.startswith("%dir ")
        path = expand(re.sub(r"^%(dir|config\(noreplace\))\s+", "", line), macros)
        entries.append((path.lstrip("/"), directory))

    def covered(f: str) -> bool:
        return any(
            fnmatch.fnmatch(f, p) or (not d and (buildroot / p).is_dir() and f.startswith(p + "/"))
            for p, d in entries
        )

    assert [f for f in sorted(files) if not covered(f)] == [], "installed but not in %files"

    def matches(p: str, directory: bool) -> bool:
        if directory:
            return (buildroot / p).is_dir()
        return any(fnmatch.fnmatch(f, p) or f.startswith(p + "/") for f in files)

    unmatched = [p for p, d in entries if not matches(p, d)]
    assert unmatched == [], "in %files but not installed"
    assert os.access(buildroot / "usr/libexec/cryptlockd/restart-when-idle", os.X_OK)
    assert_native_sleep_entry(buildroot, "/usr/libexec/cryptlockd/cryptlockd-sleep")
