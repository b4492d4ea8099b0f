"""The Prometheus text file: its figures from the properties and the state, the count of
unprotected sleeps since boot, and a file that cannot be written."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.exposition import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from cryptlockd.daemon.metrics import (
    MetricsState,
    TextfileMetrics,
    render_registry,
    sleep_was_protected,
)
from tests.unit.test_helper_cycle import GOOD, FakeOps, cycle


def samples(text: str) -> dict[str, float]:
    return {s.name: s.value for fam in text_string_to_metric_families(text) for s in fam.samples}


def protected_record() -> dict[str, Any]:
    return cycle(FakeOps([GOOD])).as_dict()


def test_figures_before_any_cycle() -> None:
    props = {"Protected": False, "Enabled": True, "Problems": ["helper-ramfs: not built yet"]}
    got = samples(generate_latest(render_registry(props, MetricsState())).decode())
    assert got["cryptlockd_protected"] == 0
    assert got["cryptlockd_enabled"] == 1
    assert got["cryptlockd_problems"] == 1
    assert got["cryptlockd_unprotected_sleeps_total"] == 0
    assert got["cryptlockd_info"] == 1
    assert "cryptlockd_last_cycle_success" not in got


def test_figures_after_a_protected_cycle() -> None:
    record = protected_record()
    assert sleep_was_protected(record)
    state = MetricsState()
    state.count(record, now_unix=1_000_000.0, now_boottime=record["started_boottime"] + 60)
    props = {"Protected": True, "Enabled": True, "Problems": [], "LastCycle": record}
    got = samples(generate_latest(render_registry(props, state)).decode())
    assert got["cryptlockd_last_cycle_success"] == 1
    assert got["cryptlockd_last_cycle_wipe_verified"] == 1
    assert got["cryptlockd_unprotected_sleeps_total"] == 0
    # The record ended within its first minute: 60 s of boottime ago, minus its length.
    assert 1_000_000.0 - 60 <= got["cryptlockd_last_cycle_timestamp_seconds"] < 1_000_000.0


@pytest.mark.parametrize(
    ("record", "counted"),
    [
        ({"success": False, "reason": "arming timed out", "protected": False}, 1),
        ({"success": False, "reason": "stock systemd-sleep ran", "suspended": []}, 1),
        ({"success": False, "reason": "sync timed out", "slept": False, "suspended": []}, 0),
    ],
)
def test_unprotected_sleeps_are_counted(record: dict[str, Any], counted: int) -> None:
    state = MetricsState()
    state.count(record, 100.0, 50.0)
    assert state.unprotected_sleeps == counted


def test_a_failed_wipe_counts_as_unprotected() -> None:
    record = protected_record()
    record["verification"] = {d: {"dm_table_key": "present"} for d in record["suspended"]}
    state = MetricsState()
    state.count(record, 100.0, 50.0)
    assert state.unprotected_sleeps == 1


def test_the_count_survives_a_restart_but_not_a_boot(tmp_path: Path) -> None:
    path = tmp_path / "run/cryptlockd/metrics-state.json"
    state = MetricsState(boot_id="boot-1")
    state.count({"protected": False}, 100.0, 50.0)
    state.save(path)
    assert MetricsState.load(path, "boot-1").unprotected_sleeps == 1
    assert MetricsState.load(path, "boot-2").unprotected_sleeps == 0
    path.write_text("{not json")
    assert MetricsState.load(path, "boot-1").unprotected_sleeps == 0


def test_the_file_is_written_and_a_failure_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = TextfileMetrics(tmp_path / "state.json")
    out = tmp_path / "textfile" / "cryptlockd.prom"
    out.parent.mkdir()
    props = {"Protected": True, "Enabled": True, "Problems": []}
    metrics.write(str(out), props)
    assert samples(out.read_text())["cryptlockd_protected"] == 1
    metrics.write("", props)  # off: nothing happens
    with caplog.at_level(logging.WARNING, logger="cryptlockd"):
        for _ in range(3):
            metrics.write(str(tmp_path / "missing" / "x.prom"), props)
    assert len([r for r in caplog.records if "metrics file" in r.getMessage()]) == 1
