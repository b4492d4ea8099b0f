"""Check() and `cryptlockctl check` name the key-wipe risks of the running kernel and
libcryptsetup (issue 5), against the real daemon on a private bus."""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

from cryptlockd.daemon import checks
from tests.fakesys import UUID_A, FakeSystem
from tests.integration.conftest import (
    REPO,
    VENV_PYTHON,
    DaemonFactory,
    LogindMock,
    PolkitMock,
    SystemBus,
)
from tests.integration.support import eventually


def ctl_check(bus: SystemBus) -> tuple[int, list[dict[str, Any]], str]:
    js = subprocess.run(
        [str(VENV_PYTHON), "-m", "cryptlockd.cli", "check", "--json"],
        env=bus.env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    text = subprocess.run(
        [str(VENV_PYTHON), "-m", "cryptlockd.cli", "check"],
        env=bus.env(),
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return js.returncode, json.loads(js.stdout), text.stdout


def test_risk_lines_in_check(
    system_bus: SystemBus,
    logind: LogindMock,
    polkit: PolkitMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
) -> None:
    start_daemon(*luks_system.daemon_args())
    eventually(lambda: logind.our_inhibitors(), message="daemon took its inhibitor")
    rc, results, text = ctl_check(system_bus)
    by_name = {r["name"]: r for r in results}
    expected = {
        r.name: r for r in checks.check_key_risks(checks.crypto_facts(luks_system.crypttab))
    }
    assert set(expected) <= set(by_name)
    kernel = by_name["risk-kernel-keyring"]
    assert os.uname().release in kernel["detail"]
    assert kernel["detail"] == expected["risk-kernel-keyring"].detail
    assert by_name["risk-libcryptsetup"]["detail"] == expected["risk-libcryptsetup"].detail
    # Informational lines: on this host they pass (the recording armer is what fails here).
    assert kernel["ok"] and by_name["risk-libcryptsetup"]["ok"], results
    assert rc == 1 and not by_name["helper"]["ok"]
    assert "risk-linked-volume-key" not in by_name
    assert "last-cycle" not in by_name  # no cycle yet
    assert any(ln.startswith("ok") and "risk-kernel-keyring" in ln for ln in text.splitlines())


def test_linked_volume_key_is_a_problem(
    system_bus: SystemBus,
    logind: LogindMock,
    polkit: PolkitMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
) -> None:
    luks_system.write_crypttab(
        f"cryptroot UUID={UUID_A} none luks,discard,link-volume-key=@u::%logon:kdump\n"
    )
    start_daemon(*luks_system.daemon_args())
    eventually(lambda: logind.our_inhibitors(), message="daemon took its inhibitor")
    _, results, text = ctl_check(system_bus)
    linked = {r["name"]: r for r in results}["risk-linked-volume-key"]
    assert not linked["ok"] and "cryptroot" in linked["detail"]
    assert any(ln.startswith("FAIL") and "risk-linked-volume-key" in ln for ln in text.splitlines())
