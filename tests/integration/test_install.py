"""`make install DESTDIR=... PREFIX=/usr/local` puts every file where SPEC section 3 says,
with the paths substituted, works offline from a wheelhouse, and the installed venv runs
the daemon's code."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PREFIX = "/usr/local"
VENV = f"{PREFIX}/lib/cryptlockd/venv"


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Everything `make install` needs from PyPI, fetched once (with the network)."""
    wh = tmp_path_factory.mktemp("wheelhouse")
    proc = subprocess.run(
        [
            str(REPO / ".venv/bin/pip"),
            "wheel",
            "-q",
            "--wheel-dir",
            str(wh),
            str(REPO),
            "setuptools",
            "wheel",
        ],
        capture_output=True,
        text=True,
        timeout=900,
        cwd=str(REPO),
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return wh


def make_install(wheelhouse: Path, *variables: str) -> None:
    """`make install` offline: PIP_NO_INDEX and PIP_FIND_LINKS reach pip (SPEC 3), and an
    index URL that cannot answer proves nothing was fetched."""
    env = {k: v for k, v in os.environ.items() if k != "VIRTUAL_ENV"}
    env.update(
        PIP_NO_INDEX="1",
        PIP_FIND_LINKS=str(wheelhouse),
        PIP_INDEX_URL="http://127.0.0.1:9/simple",
        PIP_NO_CACHE_DIR="1",
    )
    proc = subprocess.run(
        ["make", "-C", str(REPO), "install", *variables],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]


@pytest.fixture(scope="module")
def destdir(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Path:
    """Everything installed under a DESTDIR, for PREFIX=/usr/local."""
    dest = tmp_path_factory.mktemp("destdir")
    make_install(wheelhouse, f"DESTDIR={dest}", f"PREFIX={PREFIX}")
    return dest


def test_files_in_place(destdir: Path) -> None:
    expected = [
        f"{PREFIX}/bin/cryptlockd",
        f"{PREFIX}/bin/cryptlockctl",
        f"{PREFIX}/lib/systemd/system/cryptlockd.service",
        f"{PREFIX}/lib/systemd/system/systemd-suspend.service.d/cryptlockd.conf",
        "usr/share/dbus-1/system.d/org.cryptlockd1.conf",
        "usr/share/dbus-1/system-services/org.cryptlockd1.service",
        "usr/share/dbus-1/interfaces/org.cryptlockd1.Manager.xml",
        "usr/share/polkit-1/actions/org.cryptlockd1.policy",
        f"{PREFIX}/share/man/man8/cryptlockd.8",
        f"{PREFIX}/share/bash-completion/completions/cryptlockctl",
        f"{PREFIX}/share/zsh/site-functions/_cryptlockctl",
        "etc/cryptlockd/cryptlockd.conf",
    ]
    missing = [p for p in expected if not (destdir / p.lstrip("/")).is_file()]
    assert not missing
    # Nothing escapes DESTDIR into the real PREFIX.
    for p in expected:
        text = (destdir / p.lstrip("/")).read_text(errors="replace")
        assert "@BINDIR@" not in text and "@LIBDIR@" not in text and "@VENVDIR@" not in text, p
        assert str(destdir) not in text, p


@pytest.fixture(scope="module")
def prefix_install(tmp_path_factory: pytest.TempPathFactory, wheelhouse: Path) -> Path:
    """`make install` into a prefix of its own, every system directory redirected under it,
    so that the wrappers can run as they will on a machine."""
    prefix = tmp_path_factory.mktemp("prefix")
    dirs = {
        name: str(prefix / name.lower())
        for name in (
            "DBUS_POLICYDIR",
            "DBUS_SERVICEDIR",
            "DBUS_INTERFACEDIR",
            "POLKIT_ACTIONDIR",
            "SYSCONFDIR",
        )
    }
    make_install(wheelhouse, f"PREFIX={prefix}", *(f"{k}={v}" for k, v in dirs.items()))
    return prefix


def test_installed_entry_points_ignore_a_planted_package(
    prefix_install: Path, tmp_path: Path
) -> None:
    """`cd /tmp && sudo cryptlockctl status` must not import a /tmp/cryptlockd/ that any
    local user could have planted there, nor one on PYTHONPATH."""
    planted = tmp_path / "cryptlockd"
    planted.mkdir()
    (planted / "__init__.py").write_text("raise SystemExit('PLANTED CODE RAN')\n")
    (planted / "__main__.py").write_text("raise SystemExit('PLANTED CODE RAN')\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    for prog in ("cryptlockd", "cryptlockctl"):
        proc = subprocess.run(
            [str(prefix_install / "bin" / prog), "--version"],
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
            env=env,
        )
        assert "PLANTED" not in proc.stdout + proc.stderr, prog
        assert proc.returncode == 0 and proc.stdout.strip(), (prog, proc.stderr)
    # The sleep entry: the C program, with a compiler at hand (make deps installs gcc).
    dropin = prefix_install / "lib/systemd/system/systemd-suspend.service.d/cryptlockd.conf"
    exec_start = [
        line for line in dropin.read_text().splitlines() if line.startswith("ExecStart=/")
    ]
    entry = prefix_install / "libexec/cryptlockd/cryptlockd-sleep"
    assert exec_start == [f"ExecStart={entry}"]
    assert entry.read_bytes()[:4] == b"\x7fELF" and os.access(entry, os.X_OK)


def install_sleep_entry(
    dest: Path, prefix: Path, *variables: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            "make",
            "-C",
            str(REPO),
            "install-sleep-entry",
            f"DESTDIR={dest}",
            "LIBEXECDIR=/libexec",
            f"RUN_PYTHON={prefix}/lib/cryptlockd/venv/bin/python",
            *variables,
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_without_a_compiler_the_python_sleep_entry_is_installed_and_finds_the_package(
    prefix_install: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    proc = install_sleep_entry(dest, prefix_install, "CC=/nonexistent/cc", f"BUILDDIR={tmp_path}/b")
    assert proc.returncode == 0, proc.stderr
    assert "warning: /nonexistent/cc could not build the sleep entry" in proc.stderr
    script = dest / "libexec/cryptlockd-sleep"
    python = f"{prefix_install}/lib/cryptlockd/venv/bin/python"
    assert script.read_text().startswith(f"#!{python} -ISB\n") and os.access(script, os.X_OK)
    # Started as systemd starts it, it imports the installed package, not a planted one: a
    # bad argument reaches its main(), which refuses it without touching anything.
    planted = tmp_path / "plant"
    (planted / "cryptlockd").mkdir(parents=True)
    (planted / "cryptlockd" / "__init__.py").write_text("raise SystemExit('PLANTED CODE RAN')\n")
    env = {**os.environ, "PYTHONPATH": str(planted)}
    run = subprocess.run(
        [str(script), "--bogus"], capture_output=True, text=True, timeout=60, cwd=planted, env=env
    )
    assert (run.returncode, run.stderr) == (2, "usage: cryptlockd-sleep [--root=DIR]\n")


def test_a_sleep_entry_that_must_be_native_fails_without_a_compiler(
    prefix_install: Path, tmp_path: Path
) -> None:
    dest = tmp_path / "dest"
    proc = install_sleep_entry(
        dest, prefix_install, "SLEEP_ENTRY=native", "CC=/nonexistent/cc", f"BUILDDIR={tmp_path}/b"
    )
    assert proc.returncode != 0 and not (dest / "libexec/cryptlockd-sleep").exists()
    bad = install_sleep_entry(dest, prefix_install, "SLEEP_ENTRY=fast")
    assert bad.returncode != 0
    assert "error: SLEEP_ENTRY must be native, python or auto, not 'fast'" in bad.stderr


def test_wrappers_point_into_the_installed_venv(destdir: Path) -> None:
    for prog, module in (("cryptlockd", "cryptlockd.daemon"), ("cryptlockctl", "cryptlockd.cli")):
        wrapper = destdir / PREFIX.lstrip("/") / "bin" / prog
        assert os.access(wrapper, os.X_OK)
        assert f'exec {VENV}/bin/python -I -m {module} "$@"' in wrapper.read_text()
    unit = (destdir / PREFIX.lstrip("/") / "lib/systemd/system/cryptlockd.service").read_text()
    assert f"ExecStart={PREFIX}/bin/cryptlockd\n" in unit
    activation = destdir / "usr/share/dbus-1/system-services/org.cryptlockd1.service"
    assert f"Exec={PREFIX}/bin/cryptlockd\n" in activation.read_text()


def test_installed_venv_runs_the_installed_code(destdir: Path) -> None:
    python = destdir / VENV.lstrip("/") / "bin" / "python"
    out = subprocess.run(
        [
            str(python),
            "-I",
            "-c",
            "import cryptlockd.daemon, cryptlockd.defs as d; print(cryptlockd.daemon.__file__);"
            "print(d.INTROSPECTION_XML.is_file())",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=True,
    ).stdout.split()
    assert out[0].startswith(str(destdir / VENV.lstrip("/"))), out
    assert out[1] == "True"  # the XML ships inside the package
    version = subprocess.run(
        [str(python), "-I", "-m", "cryptlockd.daemon", "--version"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
        check=True,
    )
    assert version.stdout.strip()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze missing")
def test_unit_file_verifies(destdir: Path, tmp_path: Path) -> None:
    unit = (destdir / PREFIX.lstrip("/") / "lib/systemd/system/cryptlockd.service").read_text()
    # verify insists that ExecStart exists on this machine: point it at the DESTDIR copy.
    unit = unit.replace(
        f"ExecStart={PREFIX}/bin/cryptlockd", f"ExecStart={destdir}{PREFIX}/bin/cryptlockd"
    )
    (tmp_path / "cryptlockd.service").write_text(unit)
    proc = subprocess.run(
        ["systemd-analyze", "verify", "--man=no", str(tmp_path / "cryptlockd.service")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr


def test_notify_agent_installed(destdir: Path) -> None:
    """cryptlockd-notify: its wrapper, the user unit enabled for graphical sessions, the
    XDG autostart file that systemd's generator skips, and its man page."""
    root = destdir / PREFIX.lstrip("/")
    wrapper = root / "bin/cryptlockd-notify"
    assert os.access(wrapper, os.X_OK)
    assert f'exec {VENV}/bin/python -I -m cryptlockd.desktop "$@"' in wrapper.read_text()
    unit = (root / "lib/systemd/user/cryptlockd-notify.service").read_text()
    assert f"ExecStart={PREFIX}/bin/cryptlockd-notify\n" in unit
    assert "WantedBy=graphical-session.target" in unit
    assert "PartOf=graphical-session.target" in unit
    assert not (root / "lib/systemd/system/user").exists()
    wants = destdir / "etc/systemd/user/graphical-session.target.wants/cryptlockd-notify.service"
    assert os.readlink(wants) == f"{PREFIX}/lib/systemd/user/cryptlockd-notify.service"
    autostart = (destdir / "etc/xdg/autostart/cryptlockd-notify.desktop").read_text()
    assert f"Exec={PREFIX}/bin/cryptlockd-notify\n" in autostart
    assert "X-systemd-skip=true" in autostart
    assert (root / "share/man/man1/cryptlockd-notify.1").is_file()


@pytest.mark.skipif(
    shutil.which("systemd-analyze") is None or shutil.which("desktop-file-validate") is None,
    reason="systemd-analyze or desktop-file-validate missing",
)
def test_notify_agent_files_verify(destdir: Path, tmp_path: Path) -> None:
    root = destdir / PREFIX.lstrip("/")
    unit = (root / "lib/systemd/user/cryptlockd-notify.service").read_text()
    unit = unit.replace(f"ExecStart={PREFIX}/", f"ExecStart={root}/")
    (tmp_path / "cryptlockd-notify.service").write_text(unit)
    # `verify --user` sets up a user manager, which wants a runtime directory.
    runtime = tmp_path / "run"
    runtime.mkdir(mode=0o700)
    env = {**os.environ, "XDG_RUNTIME_DIR": str(runtime)}
    for argv in (
        [
            "systemd-analyze",
            "verify",
            "--user",
            "--man=no",
            str(tmp_path / "cryptlockd-notify.service"),
        ],
        ["desktop-file-validate", str(destdir / "etc/xdg/autostart/cryptlockd-notify.desktop")],
    ):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=60, env=env)
        assert proc.returncode == 0 and not proc.stdout.strip(), (argv, proc.stdout, proc.stderr)
