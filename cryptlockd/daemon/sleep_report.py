"""The record of a sleep that the helper did not run (SPEC 2.8: every sleep, protected or
not, ends in LastCycle and CycleFinished with its result and reason).

The helper's own record (helper/record.py) says "success" or "failed"; a sleep without it
says "unprotected": the keys may have stayed in RAM. What we know about why comes from the
daemon (protection disabled, arming failed), from the sleep entry's trace of its stock
fallback (protocol.STOCK_SLEEP_TRACE), and from how the sleep ended (PrepareForSleep(false)
without a cycle, logind gone, the deadline). Pure, but for take_stock_trace.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptlockd.helper.protocol import boottime

if TYPE_CHECKING:
    from cryptlockd.helper.protocol import StockSleepTrace

__all__ = [
    "NO_CYCLE",
    "SleepRequest",
    "take_stock_trace",
    "trace_record",
    "unprotected_record",
]

log = logging.getLogger(__name__)

UNPROTECTED = "unprotected"
# PrepareForSleep(false) with no record: our sleep entry never handed a sleep to the helper.
NO_CYCLE = (
    "PrepareForSleep(false) came without a cycle: hibernate, hybrid-sleep or "
    "suspend-then-hibernate (never protected), a suspend whose ExecStart= is not "
    "cryptlockd's sleep entry, or a sleep that failed or was cancelled before it ran"
)


@dataclass
class SleepRequest:
    """One PrepareForSleep(true) until its end: the record, PrepareForSleep(false), logind
    leaving the bus, or the deadline."""

    started: float  # protocol.boottime()
    devices: list[str] = field(default_factory=list)
    # Why no helper was armed for it (disabled, no device, the arm failed); "" if armed.
    unprotected: str = ""


def unprotected_record(
    request: SleepRequest, ended: float, why: str, trace: StockSleepTrace | None
) -> dict[str, Any]:
    """The LastCycle of a sleep without a cycle record. The first reason is the cause
    (as in the helper's record); the others are kept as problems."""
    reasons = [request.unprotected]
    timeline = {"sleep_requested": request.started}
    if trace is not None:
        if trace["boottime"] >= request.started:
            reasons.append(f"the sleep entry ran the stock systemd-sleep: {trace['reason']}")
            timeline["stock_sleep"] = trace["boottime"]
        else:
            log.warning("ignoring a stale trace of a stock sleep: %s", trace["reason"])
    reasons.append(why)
    timeline["ended"] = ended
    cause, *problems = [r for r in reasons if r]
    record: dict[str, Any] = {
        "result": UNPROTECTED,
        "success": False,
        "reason": cause,
        "problems": problems,
        "devices": list(request.devices),
        "suspended": [],
        "resumed": [],
        "started_boottime": request.started,
        "timeline_ms": {k: round((t - request.started) * 1000.0, 1) for k, t in timeline.items()},
        "verification": {},
    }
    if "stock_sleep" in timeline:
        # Otherwise we cannot tell (a hybrid-sleep did sleep, a cancelled suspend did not),
        # and say nothing.
        record["slept"] = True
    return record


def trace_record(trace: StockSleepTrace, devices: list[str]) -> dict[str, Any]:
    """A stock sleep found at start: it ran while no daemon could see it."""
    request = SleepRequest(trace["boottime"], devices)
    return unprotected_record(
        request, trace["boottime"], "cryptlockd was not running (found at its start)", trace
    )


def take_stock_trace(path: str) -> StockSleepTrace | None:
    """The sleep entry's trace of its stock fallback, once: removed as it is read."""
    try:
        text = Path(path).read_text()
    except FileNotFoundError:
        return None
    except OSError as e:
        # Cannot tell (an unreadable directory): no trace, and said so.
        log.error("cannot read %s: %s", path, e)
        return None
    try:
        Path(path).unlink()
    except OSError as e:
        log.error("cannot remove %s: %s", path, e)
    try:
        data = json.loads(text)
        return {"reason": str(data["reason"]), "boottime": float(data["boottime"])}
    except (ValueError, TypeError, KeyError) as e:
        # A torn or foreign file still means the stock sleep ran, at some time before now.
        return {"reason": f"(its trace {path} is unreadable: {e})", "boottime": boottime()}
