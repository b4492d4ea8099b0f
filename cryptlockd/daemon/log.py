"""Logging: to the journal with structured fields when journald runs, else to stderr.

Each kind of event has a MESSAGE_ID (one table below), so `journalctl MESSAGE_ID=...`
finds every occurrence. Call sites pass it with `extra=event(MessageId.X, FIELD=value)`.
"""

from __future__ import annotations

import logging
import os
import sys
from enum import StrEnum
from typing import Any

JOURNAL_SOCKET = "/run/systemd/journal/socket"


class MessageId(StrEnum):
    """One id per event kind (random 128-bit ids, generated once; never reuse or change them)."""

    STARTED = "3e5ee863fedb4bfda2897ae4d558e6fa"
    STOPPING = "6e191abff5704525b9e7289f38350284"
    INHIBITOR_TAKEN = "cafd56754da34c49aa60dd29826ebfba"
    INHIBITOR_RELEASED = "f65336e42c8146379b07db7e26133c8c"
    INHIBITOR_FAILED = "1e64d07d30294b1daa51da228e43369d"
    PREPARE_FOR_SLEEP = "8ca3017fc8d549fd8fb1cd11f80efc47"
    FORGED_SIGNAL = "e93918be99564b4db40a68f9204d5b5f"
    ARMED = "b3fc36c5c2c24a6a9cb38d35b7bfe552"
    UNPROTECTED_SLEEP = "144ea9ecd7de4bb0be76d54de99a65c9"
    RESUMED = "1d23c6d6e67e476d88ec1c28d837d89a"
    CYCLE_FINISHED = "33bf061a97f3463a8d45d3c5250a5582"
    LOGIND_OWNER_CHANGED = "2be552ce74c24161aa7eab586355c9c3"
    AUTHORIZATION = "a5d08defe1d048009f605df412ca633f"
    CONFIG_LOADED = "4cb240d7bab24629824c70b00afa96a2"
    CONFIG_INVALID = "b20f6228053349a391cce34b5141d9ea"
    PROTECTION_CHANGED = "68995cdc211044b59a53848de36a91ae"
    DEVICES_CHANGED = "675b69aa668b419784b919525acd5fa0"
    SUSPEND_REQUESTED = "8ab8f72eb26a4d8d9c9a656f6293d870"
    LOCK_REQUESTED = "5c4870b10e5c4662881ed6bf25e7d454"


def event(message_id: MessageId, **fields: Any) -> dict[str, Any]:
    """The `extra=` of a log call: the MESSAGE_ID plus upper-case journal fields."""
    extra: dict[str, Any] = {"MESSAGE_ID": message_id.value}
    extra.update({k.upper(): v for k, v in fields.items()})
    return extra


class _StderrFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = super().format(record)
        msg_id = getattr(record, "MESSAGE_ID", None)
        if msg_id:
            name = MessageId(msg_id).name if msg_id in MessageId._value2member_map_ else msg_id
            line = f"{line} [{name}]"
        return line


def _journal_handler() -> logging.Handler | None:
    try:
        from systemd.journal import JournalHandler
    except ImportError:
        return None
    handler: logging.Handler = JournalHandler(SYSLOG_IDENTIFIER="cryptlockd")
    return handler


def setup_logging(target: str = "auto", debug: bool = False) -> str:
    """Choose the handler once, at start-up: journal.send() silently drops messages when
    no journald listens, so "auto" looks for its socket. Returns the target chosen."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.setLevel(logging.DEBUG if debug else logging.INFO)
    chosen = target
    if target == "auto":
        chosen = "journal" if os.path.exists(JOURNAL_SOCKET) else "stderr"
    handler = _journal_handler() if chosen == "journal" else None
    if handler is None:
        chosen = "stderr"
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(_StderrFormatter("%(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    return chosen
