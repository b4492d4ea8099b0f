"""What cryptlockd-notify says, and when: pure functions of the daemon's public values
(a CycleFinished record, the Protected and Problems properties). No I/O here.
"""

from __future__ import annotations

import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import IntEnum
from typing import Any

__all__ = [
    "Notice",
    "ProtectionWatch",
    "Urgency",
    "cycle_notice",
    "unprotected_notice",
]

WIPED_SUMMARY = "Disk keys were wiped while asleep (verified)"
NOT_PROTECTED_SUMMARY = "This sleep was NOT protected: {reason}"
# The same for Lock()'s cycle (its record's "action" is "lock").
LOCK_WIPED_SUMMARY = "Disk keys were wiped while locked (verified)"
LOCK_NOT_PROTECTED_SUMMARY = "This lock did NOT wipe the disk keys: {reason}"
NEXT_SLEEP_SUMMARY = "The next sleep will NOT wipe the disk keys"
UNKNOWN_REASON = "no reason given"
# The daemon's strings end up in a one-line summary: keep a reason readable there.
MAX_REASON = 200


class Urgency(IntEnum):
    """The Desktop Notifications spec's "urgency" hint."""

    LOW = 0
    NORMAL = 1
    CRITICAL = 2


@dataclass(frozen=True)
class Notice:
    summary: str
    body: str
    urgency: Urgency


def one_line(text: object, limit: int = MAX_REASON) -> str:
    words = " ".join(str(text).split())
    return words if len(words) <= limit else words[: limit - 1] + "…"


def _body(lines: Sequence[str]) -> str:
    # Servers that announce "body-markup" read the body as a subset of HTML: the daemon's
    # text (a device name, a reason) must not be taken for markup.
    return "\n".join(html.escape(line, quote=False) for line in lines if line)


def _devices(record: Mapping[str, Any], key: str) -> list[str]:
    value = record.get(key)
    return [str(d) for d in value] if isinstance(value, (list, tuple)) else []


def cycle_notice(success: bool, record: Mapping[str, Any]) -> Notice:
    """The notification for one CycleFinished(success, record). A cycle succeeds only
    when the wipe of every device was verified (SPEC 4: an unverified wipe is a failed
    protection), so success is what "verified" rests on."""
    problems = [one_line(p) for p in record.get("problems") or () if str(p).strip()]
    lock = record.get("action") == "lock"
    if success:
        devices = _devices(record, "suspended") or _devices(record, "devices")
        lines = [f"Devices: {', '.join(devices)}" if devices else "", *problems]
        return Notice(LOCK_WIPED_SUMMARY if lock else WIPED_SUMMARY, _body(lines), Urgency.NORMAL)
    reason = one_line(record.get("reason") or "")
    if not reason:
        reason = problems.pop(0) if problems else UNKNOWN_REASON
    lines = [p for p in problems if p != reason]
    if record.get("recovered"):
        lines.append("The sleep-cycle helper died and was recovered.")
    summary = LOCK_NOT_PROTECTED_SUMMARY if lock else NOT_PROTECTED_SUMMARY
    return Notice(summary.format(reason=reason), _body(lines), Urgency.CRITICAL)


def unprotected_notice(problems: Sequence[str]) -> Notice:
    """The warning for Protected turning false: the daemon's Problems say why."""
    lines = [one_line(p) for p in problems if str(p).strip()] or [UNKNOWN_REASON]
    return Notice(NEXT_SLEEP_SUMMARY, _body(lines), Urgency.CRITICAL)


class ProtectionWatch:
    """Warns once each time Protected turns false: not again while it stays false (a
    property change that repeats the value, the daemon restarting), and again after it has
    been true in between. A false at start counts as a turn: the user has not been told."""

    def __init__(self) -> None:
        self.warned = False

    def update(self, protected: bool, problems: Sequence[str]) -> Notice | None:
        if protected:
            self.warned = False
            return None
        if self.warned:
            return None
        self.warned = True
        return unprotected_notice(problems)
