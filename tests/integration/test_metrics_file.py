"""The daemon keeps the Prometheus text file of `metrics.textfile` up to date: written at
start, rewritten when a property changes, and parsable by prometheus_client's own parser."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from dbus_fast.aio import MessageBus
from prometheus_client.parser import text_string_to_metric_families

from cryptlockd.defs import POLKIT_ACTION_CONFIGURE
from tests.fakesys import FakeSystem, two_disks_keyfile
from tests.integration.conftest import DaemonFactory, LogindMock, PolkitMock, SystemBus
from tests.integration.support import manager_proxy
from tests.wait import DEFAULT_TIMEOUT, wait_until_async


def figures(path: Path) -> dict[str, float]:
    try:
        text = path.read_text()
    except FileNotFoundError:
        return {}
    return {s.name: s.value for f in text_string_to_metric_families(text) for s in f.samples}


@pytest.mark.asyncio
async def test_the_metrics_file_follows_the_properties(
    system_bus: SystemBus,
    logind: LogindMock,
    polkit: PolkitMock,
    start_daemon: DaemonFactory,
    daemon_root: Path,
    tmp_path: Path,
    client: MessageBus,
) -> None:
    prom = tmp_path / "textfile" / "cryptlockd.prom"
    prom.parent.mkdir()
    conf = daemon_root / "etc" / "cryptlockd" / "cryptlockd.conf"
    conf.parent.mkdir(parents=True, exist_ok=True)
    conf.write_text(f'[metrics]\ntextfile = "{prom}"\n')
    fake = FakeSystem(tmp_path / "fake")
    two_disks_keyfile(fake)
    await asyncio.to_thread(start_daemon, *fake.daemon_args())

    await wait_until_async(lambda: figures(prom).get("cryptlockd_enabled") == 1)
    first = figures(prom)
    # The recording armer never protects (its helper check fails), and Problems says so.
    assert first["cryptlockd_protected"] == 0
    assert first["cryptlockd_problems"] >= 1
    assert first["cryptlockd_unprotected_sleeps_total"] == 0
    assert "cryptlockd_last_cycle_success" not in first

    polkit.allow(POLKIT_ACTION_CONFIGURE)
    manager = await manager_proxy(client)
    await asyncio.wait_for(manager.call_set_enabled(False), DEFAULT_TIMEOUT)  # type: ignore[attr-defined]
    await wait_until_async(lambda: figures(prom).get("cryptlockd_enabled") == 0)
