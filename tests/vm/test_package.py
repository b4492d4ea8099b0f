"""The Debian package (issue 13, acceptance 1 and 2), on trixie, the release it is built for
(bookworm's pydantic is 1.10: bookworm installs from source, test_installed.py and the rest).

`make deb` builds it on the host, once per session, and runs lintian (no error, no warning);
the package's files are checked on the host. In the base guest (no `make install`) it is
installed with apt-get, offline: its dependencies are in the trixie image (image.py's
SUITE_PACKAGES). Then a protected cycle with the wipe verified, a reinstall that restarts the
idle daemon the way an upgrade does, a purge that leaves nothing behind, and a stock sleep.
"""

from __future__ import annotations

import io
import posixpath
import subprocess
import tarfile
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from cryptlockd import __version__
from tests.vm import layout
from tests.vm.guest import Guest
from tests.vm.sleepcycle import (
    MANAGER,
    PROMPT_NOTICE,
    armed_ready,
    assert_complete,
    last_cycle,
    run_cycle,
    suspend,
    wake,
)
from tests.wait import wait_until_async

pytestmark = [
    pytest.mark.vm,
    pytest.mark.vm_suites("trixie"),
    pytest.mark.timeout(1200),
]

REPO = Path(__file__).resolve().parents[2]
# Architecture: any (the C sleep entry): the host's architecture, which is the guest's.
DEB_ARCH = subprocess.run(
    ["dpkg", "--print-architecture"], capture_output=True, text=True, check=False
).stdout.strip()
DEB_NAME = f"cryptlockd_{__version__}_{DEB_ARCH}.deb"
GUEST_DEB = f"/root/{DEB_NAME}"
APT = "DEBIAN_FRONTEND=noninteractive apt-get -y -q"
PROM_DIR = "/var/lib/prometheus/node-exporter"
# What the package puts in place, at trixie's paths (SPEC 3's installed files and more).
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
    "usr/share/man/man1/cryptlockctl.1.gz",
    "usr/share/man/man5/cryptlockd.conf.5.gz",
    "usr/share/man/man5/org.cryptlockd1.5.gz",
    "usr/share/man/man8/cryptlockd.8.gz",
    "usr/share/bash-completion/completions/cryptlockctl",
    "usr/share/zsh/vendor-completions/_cryptlockctl",
    "usr/libexec/cryptlockd/restart-when-idle",
    "usr/libexec/cryptlockd/cryptlockd-sleep",
    "etc/cryptlockd/cryptlockd.conf",
    "usr/lib/systemd/user/cryptlockd-notify.service",
    "etc/xdg/autostart/cryptlockd-notify.desktop",
    "usr/bin/cryptlockd-notify",
    f"usr/lib/python3/dist-packages/cryptlockd-{__version__}.dist-info/METADATA",
]


@pytest.fixture(scope="session")
def deb() -> Path:
    """`make deb` on the host: the build, lintian (it fails the target on an error or a
    warning) and the result in dist/."""
    proc = subprocess.run(
        ["make", "-C", str(REPO), "deb"], capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    path = REPO / "dist" / DEB_NAME
    assert path.is_file(), f"make deb made no {path}"
    return path


def deb_contents(deb: Path) -> tuple[dict[str, tarfile.TarInfo], dict[str, bytes]]:
    """The data archive's members by path (no leading ./), and the text of its regular
    files that are not compressed, read with dpkg-deb."""
    data = subprocess.run(
        ["dpkg-deb", "--fsys-tarfile", str(deb)], capture_output=True, check=True, timeout=60
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        members = {m.name.removeprefix("./"): m for m in tar.getmembers()}
        texts = {
            name: (tar.extractfile(m) or io.BytesIO()).read()
            for name, m in members.items()
            if m.isfile() and not name.endswith(".gz")
        }
    return members, texts


def test_package_files_and_dependencies(deb: Path) -> None:
    members, texts = deb_contents(deb)
    assert not [p for p in PACKAGE_FILES if p not in members], "missing from the package"
    # The user unit's link is postinst's (dh_installsystemduser), not a file of the package.
    assert not [p for p in members if p.startswith("etc/systemd/")], "a unit link shipped"
    # Every module of the checkout, as is (the package carries no build step).
    modules = sorted(
        str(p.relative_to(REPO))
        for p in (REPO / "cryptlockd").rglob("*.py")
        if "__pycache__" not in p.parts
    )
    site = "usr/lib/python3/dist-packages/"
    assert [m for m in modules if site + m not in members] == []
    for name, data in texts.items():
        assert b"@BINDIR@" not in data and b"@RUN_PYTHON@" not in data, name
        assert b"@VENVDIR@" not in data and b"@LIBDIR@" not in data, name
    # No symlink points nowhere (the checkout links the interface XML from outside).
    for name, m in members.items():
        if m.issym():
            target = posixpath.normpath(posixpath.join(posixpath.dirname(name), m.linkname))
            assert target.lstrip("/") in members, (name, m.linkname)
    # The entry points run the system's python3, isolated (-I); the sleep entry is the C one.
    for prog, module in (("cryptlockd", "cryptlockd.daemon"), ("cryptlockctl", "cryptlockd.cli")):
        assert members[f"usr/bin/{prog}"].mode & 0o111
        assert f'exec /usr/bin/python3 -I -m {module} "$@"' in texts[f"usr/bin/{prog}"].decode()
    dropin = texts["usr/lib/systemd/system/systemd-suspend.service.d/cryptlockd.conf"].decode()
    assert "\nExecStart=/usr/libexec/cryptlockd/cryptlockd-sleep\n" in dropin
    assert texts["usr/libexec/cryptlockd/cryptlockd-sleep"][:4] == b"\x7fELF"
    assert members["usr/libexec/cryptlockd/cryptlockd-sleep"].mode & 0o111
    assert (
        "ExecStart=/usr/bin/cryptlockd\n"
        in texts["usr/lib/systemd/system/cryptlockd.service"].decode()
    )
    fields = subprocess.run(
        ["dpkg-deb", "-f", str(deb), "Depends", "Version"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert f"Version: {__version__}" in fields
    for dep in (
        "python3-dbus-fast (>= 2.21)",
        "python3-pydantic (>= 2.5)",
        "python3-pydantic (<< 3)",
        "python3-pyudev",
        "python3-systemd",
        "python3-prometheus-client",
        "libcryptsetup12",
        "polkitd",
        "systemd",
        "libc6",  # ${shlibs:Depends}: the C sleep entry
    ):
        assert dep in fields, (dep, fields)
    conffiles = subprocess.run(
        ["dpkg-deb", "--ctrl-tarfile", str(deb)], capture_output=True, check=True, timeout=60
    ).stdout
    assert b"/etc/cryptlockd/cryptlockd.conf" in conffiles


async def metrics_after_a_cycle(g: Guest) -> dict[str, float] | None:
    """The figures of the guest's metrics file once it tells of a cycle and of a daemon
    protected again (its next idle helper ready), else None."""
    text = (await g.run(f"cat {PROM_DIR}/cryptlockd.prom")).stdout
    got = {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}
    done = "cryptlockd_last_cycle_success" in got and got.get("cryptlockd_protected") == 1
    return got if done else None


async def daemon_pid(g: Guest) -> int:
    return int((await g.run("systemctl show -P MainPID cryptlockd.service")).stdout)


# Made by postinst (deb-systemd-helper --user enable), removed by the purge.
USER_WANTS = "/etc/systemd/user/graphical-session.target.wants/cryptlockd-notify.service"
LEFTOVERS = (
    "ls -d /etc/cryptlockd /run/cryptlockd /usr/lib/python3/dist-packages/cryptlockd "
    "/usr/bin/cryptlockd /usr/lib/systemd/system/cryptlockd.service "
    "/usr/lib/systemd/system/systemd-suspend.service.d/cryptlockd.conf "
    "/etc/systemd/system/multi-user.target.wants/cryptlockd.service "
    f"{USER_WANTS} {PROM_DIR}/cryptlockd.prom 2>/dev/null; "
    "grep -E 'cryptlockd' /proc/self/mountinfo; true"
)


@pytest.mark.asyncio
async def test_package_installs_protects_upgrades_and_purges(deb: Path, guest: Guest) -> None:
    g = guest
    await g.write_file(GUEST_DEB, deb.read_bytes())

    # 1. apt-get install ./...deb, offline: enabled and started the Debian way.
    install = await g.run(f"cd /root && {APT} install ./{DEB_NAME}", timeout=600)
    print(f"\napt-get install: {install.seconds:.1f} s")
    assert (await g.run("systemctl is-enabled cryptlockd.service")).stdout.strip() == "enabled"
    await g.run("systemctl is-active cryptlockd.service")
    dropin = await g.run("systemctl cat systemd-suspend.service")
    assert "ExecStart=/usr/libexec/cryptlockd/cryptlockd-sleep\n" in dropin.stdout
    # The desktop agent: enabled for every user's graphical session (systemctl --global).
    enabled = await g.run("systemctl --global is-enabled cryptlockd-notify.service")
    assert enabled.stdout.strip() == "enabled"
    await g.run(f'test "$(readlink -e {USER_WANTS})" = '
                '"$(readlink -e /usr/lib/systemd/user/cryptlockd-notify.service)"')  # fmt: skip
    # py3compile compiled the modules for the guest's python (3.13, not the builder's).
    await g.run("ls /usr/lib/python3/dist-packages/cryptlockd/__pycache__/*.cpython-313.pyc")
    # A Prometheus file, in a runtime drop-in (purge must remove both).
    await g.run(
        f"mkdir -p {PROM_DIR} /run/cryptlockd/cryptlockd.conf.d && printf "
        f"'[metrics]\\ntextfile = \"{PROM_DIR}/cryptlockd.prom\"\\n' "
        "> /run/cryptlockd/cryptlockd.conf.d/metrics.conf && cryptlockctl reload"
    )
    await g.wait_for_command(f"test -s {PROM_DIR}/cryptlockd.prom", 60, "the metrics file")

    # 2. A protected cycle: prompt, passphrase, both disks back, keys verified gone.
    await armed_ready(g)
    cycle = await run_cycle(g, [layout.PASSPHRASE], "systemctl suspend")
    rec = await last_cycle(g, cycle.since)
    timeline = assert_complete(rec)
    print(f"packaged cycle: trigger->SUSPEND {cycle.to_suspend:.2f} s, timeline_ms {timeline}")
    # The fleet's view of it, read with prometheus_client's own parser.
    figures = await wait_until_async(
        lambda: metrics_after_a_cycle(g),
        60,
        interval=0.5,
        message="the metrics file after the cycle",
    )
    assert figures["cryptlockd_last_cycle_success"] == 1
    assert figures["cryptlockd_last_cycle_wipe_verified"] == 1
    assert figures["cryptlockd_unprotected_sleeps_total"] == 0
    assert figures["cryptlockd_enabled"] == 1
    assert figures["cryptlockd_last_cycle_timestamp_seconds"] > 1.7e9  # Unix time, not boottime

    # 3. An upgrade (a reinstall runs the same postinst, "configure <old version>"): the
    # daemon is idle, so restart-when-idle restarts it, and it is protected again.
    before = await daemon_pid(g)
    await g.run(f"cd /root && {APT} install --reinstall ./{DEB_NAME}", timeout=600)
    after = await daemon_pid(g)
    assert after not in (0, before), "the upgrade did not restart the idle daemon"
    await armed_ready(g)
    state = await g.run(f"busctl get-property {MANAGER} State")
    assert state.stdout.strip() == 's "idle"'

    # 4. Purge: nothing of it stays, not the helper, its RAM filesystem or the metrics file.
    await g.run(f"{APT} purge cryptlockd", timeout=300)
    left = await g.run(LEFTOVERS)
    assert left.stdout.strip() == "", f"left behind by the purge:\n{left.stdout}"
    for unit in ("cryptlockd.service", "cryptlockd-helper.service"):
        active = await g.run(f"systemctl is-active {unit}", check=False)
        assert active.stdout.strip() in ("inactive", "unknown"), (unit, active.stdout)
    assert "cryptlockd" not in (await g.run("systemctl cat systemd-suspend.service")).stdout

    # 5. A stock sleep: the machine sleeps once and wakes, no prompt, the disks usable.
    notices = g.console_count(PROMPT_NOTICE)
    mark = g.event_mark()
    to_suspend = await suspend(g, "systemctl suspend")
    await wake(g, what="the stock sleep after the purge")
    assert [e.name for e in g.events[mark:]].count("SUSPEND") == 1
    assert g.console_count(PROMPT_NOTICE) == notices, "a prompt after the purge"
    for path in ("/data/after", "/root/after"):
        await g.run(
            f"dd if=/dev/urandom of={path} bs=4k count=64 oflag=direct status=none && "
            f"dd if={path} of=/dev/null bs=4k iflag=direct status=none"
        )
    print(f"stock sleep after the purge: trigger->SUSPEND {to_suspend:.2f} s")
