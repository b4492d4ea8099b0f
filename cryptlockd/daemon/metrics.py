"""The fleet's view: a Prometheus text file for node_exporter's textfile collector.

Written (atomically, by prometheus_client) whenever a property changes or a cycle finishes,
when `metrics.textfile` is set. The count of unprotected sleeps is "since boot", so it
lives in /run, where a restarted daemon finds it again.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cryptlockd import __version__
from cryptlockd.defs import RUNTIME_DIR
from cryptlockd.helper.protocol import boottime
from cryptlockd.helper.record import device_verified

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

__all__ = ["MetricsState", "TextfileMetrics", "render_registry", "sleep_was_protected"]

log = logging.getLogger("cryptlockd")

STATE_FILE = Path(RUNTIME_DIR) / "metrics-state.json"


def sleep_was_protected(record: Mapping[str, Any]) -> bool:
    """Whether the sleep of a cycle record had every key of the cycle wiped and verified.
    A record that says so itself ("protected") is taken at its word."""
    if "protected" in record:
        return bool(record["protected"])
    suspended = record.get("suspended") or []
    verification = record.get("verification") or {}
    return bool(suspended) and all(device_verified(verification.get(d, {})) for d in suspended)


def sleep_happened(record: Mapping[str, Any]) -> bool:
    # A record without "slept" comes from a path that could not tell (the stock fallback):
    # count it as a sleep, so that an unprotected one is never missed.
    return bool(record.get("slept", True))


class MetricsState:
    """What the file carries beyond the properties: survives a daemon restart, not a boot."""

    def __init__(
        self, unprotected_sleeps: int = 0, last_cycle_unix: float = 0.0, boot_id: str = ""
    ) -> None:
        self.unprotected_sleeps = unprotected_sleeps
        self.last_cycle_unix = last_cycle_unix
        self.boot_id = boot_id

    @classmethod
    def load(cls, path: Path, boot_id: str) -> MetricsState:
        try:
            data = json.loads(path.read_text())
            if data.get("boot_id") != boot_id:
                return cls(boot_id=boot_id)
            return cls(int(data["unprotected_sleeps"]), float(data["last_cycle_unix"]), boot_id)
        except (OSError, ValueError, KeyError, TypeError, AttributeError):
            return cls(boot_id=boot_id)

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(
            json.dumps(
                {
                    "unprotected_sleeps": self.unprotected_sleeps,
                    "last_cycle_unix": self.last_cycle_unix,
                    "boot_id": self.boot_id,
                }
            )
        )
        os.replace(tmp, path)

    def count(self, record: Mapping[str, Any], now_unix: float, now_boottime: float) -> None:
        if sleep_happened(record) and not sleep_was_protected(record):
            self.unprotected_sleeps += 1
        # The record's clock is CLOCK_BOOTTIME; the file wants Unix time.
        timeline = record.get("timeline_ms") or {}
        start = record.get("started_boottime")
        if isinstance(start, int | float) and start > 0 and timeline:
            end = float(start) + max(float(v) for v in timeline.values()) / 1000.0
            self.last_cycle_unix = now_unix - max(0.0, now_boottime - end)
        else:
            self.last_cycle_unix = now_unix


def render_registry(properties: Mapping[str, Any], state: MetricsState) -> CollectorRegistry:
    """The figures, from the D-Bus properties (plain values) and the state. Pure."""
    # Imported only when a metrics file is asked for: prometheus_client (with the http and
    # ssl modules it brings) is several MiB of the daemon's RSS (issue 12, idle cost).
    from prometheus_client import CollectorRegistry, Counter, Gauge, Info

    reg = CollectorRegistry()
    Info("cryptlockd", "cryptlockd's version", registry=reg).info({"version": __version__})
    Gauge(
        "cryptlockd_protected", "1 when the next suspend will wipe the disk keys", registry=reg
    ).set(1 if properties.get("Protected") else 0)
    Gauge("cryptlockd_enabled", "1 when protection is switched on", registry=reg).set(
        1 if properties.get("Enabled") else 0
    )
    Gauge("cryptlockd_problems", "the number of lines in the Problems property", registry=reg).set(
        len(properties.get("Problems") or [])
    )
    Counter(
        "cryptlockd_unprotected_sleeps",
        "sleeps since boot that did not have every disk key wiped",
        registry=reg,
    ).inc(state.unprotected_sleeps)
    last = properties.get("LastCycle") or {}
    if last:
        Gauge("cryptlockd_last_cycle_success", "1 when the last cycle succeeded", registry=reg).set(
            1 if last.get("success") else 0
        )
        Gauge(
            "cryptlockd_last_cycle_wipe_verified",
            "1 when every key of the last cycle was seen wiped while asleep",
            registry=reg,
        ).set(1 if sleep_was_protected(last) else 0)
        Gauge(
            "cryptlockd_last_cycle_timestamp_seconds",
            "when the last cycle ended, in Unix time",
            registry=reg,
        ).set(state.last_cycle_unix)
    return reg


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


class TextfileMetrics:
    def __init__(self, state_file: Path = STATE_FILE) -> None:
        self.state_file = state_file
        self.state = MetricsState.load(state_file, _boot_id())
        self._failing = ""

    def cycle_finished(self, record: Mapping[str, Any]) -> None:
        self.state.count(record, time.time(), boottime())
        try:
            self.state.save(self.state_file)
        except OSError as e:
            log.warning("cannot keep the metrics' state in %s: %s", self.state_file, e)

    def write(self, path: str, properties: Mapping[str, Any]) -> None:
        """Writes the file at `path` ("" = off). Failures are logged once, not raised: the
        fleet's view must never get in the way of a sleep."""
        if not path:
            return
        from prometheus_client import write_to_textfile  # as in render_registry

        try:
            write_to_textfile(path, render_registry(properties, self.state))
        except OSError as e:
            if self._failing != str(e):
                log.warning("cannot write the metrics file %s: %s", path, e)
            self._failing = str(e)
        else:
            self._failing = ""
