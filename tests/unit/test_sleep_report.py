"""The record of a sleep the helper did not run (cryptlockd/daemon/sleep_report.py), and the
sleep entry's trace of its stock fallback that feeds it."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryptlockd import sleep_entry
from cryptlockd.daemon import sleep_report
from cryptlockd.daemon.sleep_report import SleepRequest


def test_the_first_reason_is_the_cause_the_rest_are_problems() -> None:
    req = SleepRequest(100.0, ["root", "data"], unprotected="cannot arm the helper: boom")
    trace = {"reason": "no cryptlockd helper is armed", "boottime": 101.0}
    rec = sleep_report.unprotected_record(req, 130.0, sleep_report.NO_CYCLE, trace)  # type: ignore[arg-type]
    assert rec["result"] == "unprotected" and rec["success"] is False
    assert rec["reason"] == "cannot arm the helper: boom"
    assert rec["problems"] == [
        "the sleep entry ran the stock systemd-sleep: no cryptlockd helper is armed",
        sleep_report.NO_CYCLE,
    ]
    assert rec["slept"] is True
    assert rec["timeline_ms"] == {"sleep_requested": 0.0, "stock_sleep": 1000.0, "ended": 30000.0}
    assert rec["devices"] == ["root", "data"] and rec["started_boottime"] == 100.0


def test_without_anything_known_the_end_is_the_reason_and_a_stale_trace_is_dropped() -> None:
    stale = {"reason": "an older stock sleep", "boottime": 50.0}
    rec = sleep_report.unprotected_record(SleepRequest(100.0), 101.0, "logind left", stale)  # type: ignore[arg-type]
    assert rec["reason"] == "logind left" and rec["problems"] == []
    assert "slept" not in rec and "stock_sleep" not in rec["timeline_ms"]


def test_a_trace_found_at_start_is_a_record_of_its_own() -> None:
    rec = sleep_report.trace_record({"reason": "daemon stopped", "boottime": 42.0}, ["root"])
    assert rec["reason"] == "the sleep entry ran the stock systemd-sleep: daemon stopped"
    assert rec["problems"] == ["cryptlockd was not running (found at its start)"]
    assert rec["started_boottime"] == 42.0 and rec["slept"] is True


def test_the_entry_leaves_a_trace_that_is_taken_once(tmp_path: Path) -> None:
    path = str(tmp_path / "run" / "cryptlockd" / "stock-sleep.json")
    sleep_entry.leave_trace("nothing armed", path)
    assert (tmp_path / "run" / "cryptlockd").stat().st_mode & 0o777 == 0o700
    assert Path(path).stat().st_mode & 0o777 == 0o600
    trace = sleep_report.take_stock_trace(path)
    assert trace is not None and trace["reason"] == "nothing armed" and trace["boottime"] > 0
    assert sleep_report.take_stock_trace(path) is None


def test_an_unreadable_trace_still_counts_as_a_stock_sleep(tmp_path: Path) -> None:
    path = tmp_path / "stock-sleep.json"
    path.write_text("{torn")
    trace = sleep_report.take_stock_trace(str(path))
    assert trace is not None and "unreadable" in trace["reason"]
    assert not path.exists()
    rec = sleep_report.unprotected_record(SleepRequest(0.0), trace["boottime"], "end", trace)
    assert rec["slept"] is True


def test_a_trace_that_cannot_be_written_does_not_stop_the_sleep(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "file").write_text("")
    sleep_entry.leave_trace("why", str(tmp_path / "file" / "stock-sleep.json"))
    assert "cannot leave the trace" in capsys.readouterr().out
