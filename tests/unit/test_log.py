"""Log target chosen once at start-up; every event kind has its own MESSAGE_ID."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from cryptlockd.daemon import log as cl_log
from cryptlockd.daemon.log import MessageId, event, setup_logging


@pytest.fixture(autouse=True)
def restore_root_logger() -> object:
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    yield None
    root.handlers[:] = handlers
    root.setLevel(level)


def test_auto_picks_stderr_without_journald(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(cl_log, "JOURNAL_SOCKET", str(tmp_path / "absent"))
    assert setup_logging("auto") == "stderr"
    [h] = logging.getLogger().handlers
    assert isinstance(h, logging.StreamHandler)


def test_auto_picks_journal_when_its_socket_exists(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    pytest.importorskip("systemd.journal", reason="systemd-python not installed")
    sock = tmp_path / "socket"
    sock.write_text("")
    monkeypatch.setattr(cl_log, "JOURNAL_SOCKET", str(sock))
    assert setup_logging("auto") == "journal"
    [h] = logging.getLogger().handlers
    assert type(h).__name__ == "JournalHandler"


def test_message_ids_unique_and_well_formed() -> None:
    ids = [m.value for m in MessageId]
    assert len(set(ids)) == len(ids)
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert event(MessageId.ARMED, arm_seconds="0.1") == {
        "MESSAGE_ID": MessageId.ARMED.value,
        "ARM_SECONDS": "0.1",
    }


def test_stderr_lines_name_the_event(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(cl_log, "JOURNAL_SOCKET", str(tmp_path / "absent"))
    setup_logging("stderr")
    logging.getLogger("t").warning("hello", extra=event(MessageId.FORGED_SIGNAL))
    assert "hello [FORGED_SIGNAL]" in capsys.readouterr().err
