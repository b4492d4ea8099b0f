"""Check() and `cryptlockctl check` name the key-wipe risks of the running kernel and
libcryptsetup (issue 5), against the real daemon on a private bus."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import pytest

from cryptlockd.daemon import key_risks
from tests.fakesys import UUID_A, FakeSystem
from tests.integration.conftest import DaemonFactory, LogindMock, PolkitMock, SystemBus
from tests.integration.support import ctl, start_settled

RunCheck = Callable[[], tuple[int, list[dict[str, Any]], str]]


@pytest.fixture
def run_check(
    system_bus: SystemBus,
    logind: LogindMock,
    polkit: PolkitMock,
    start_daemon: DaemonFactory,
    luks_system: FakeSystem,
) -> RunCheck:
    """Starts the daemon on luks_system as the test has left it, then runs
    `cryptlockctl check`: its exit status, its --json results, and its text."""

    def run() -> tuple[int, list[dict[str, Any]], str]:
        start_settled(start_daemon, logind, *luks_system.daemon_args())
        js = ctl(system_bus, "check", "--json")
        return js.returncode, json.loads(js.stdout), ctl(system_bus, "check").stdout

    return run


def test_risk_lines_in_check(run_check: RunCheck, luks_system: FakeSystem) -> None:
    rc, results, text = run_check()
    by_name = {r["name"]: r for r in results}
    expected = {
        r.name: r for r in key_risks.check_key_risks(key_risks.crypto_facts(luks_system.crypttab))
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


def test_linked_volume_key_is_a_problem(run_check: RunCheck, luks_system: FakeSystem) -> None:
    luks_system.write_crypttab(
        f"cryptroot UUID={UUID_A} none luks,discard,link-volume-key=@u::%logon:kdump\n"
    )
    _, results, text = run_check()
    linked = {r["name"]: r for r in results}["risk-linked-volume-key"]
    assert not linked["ok"] and "cryptroot" in linked["detail"]
    assert any(ln.startswith("FAIL") and "risk-linked-volume-key" in ln for ln in text.splitlines())
