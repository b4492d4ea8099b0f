"""The real daemon with an armer that only records: `python -m tests.integration.recording_daemon
<daemon arguments>`. The host has no device-mapper and no systemd to run the helper under, so
the integration tests start the daemon this way and check what it does around the helper.
The unit tests use RecordingArmer too. RECORDING_ARMER_READY_FILE: the armer is ready once
that file exists; RECORDING_ARMER_PROTECTS=1: its helper line says yes;
RECORDING_ARMER_CYCLE_FILE: when that file exists at an arming, its JSON
{"success": bool, "record": {...}} is reported as the cycle once the daemon asks it to stand
down (at PrepareForSleep(false)), as a helper that ran the cycle; RECORDING_ARMER_FAIL_FILE: while
that file exists, arm() fails with its content as the reason; RECORDING_ARMER_LOCK_HOLD_FILE:
a Lock()'s cycle runs (State locked) while that file exists, as a helper at its prompt."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from cryptlockd.daemon import checks
from cryptlockd.daemon.armer import ArmOptions, CycleCallback
from cryptlockd.daemon.checks import CheckResult
from cryptlockd.daemon.config import Config
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.daemon.main import main
from cryptlockd.errors import CryptlockdError


class RecordingArmer:
    """Arms nothing and remembers the calls; its "helper" check fails, so the daemon is
    never Protected with it."""

    def __init__(
        self,
        ready_file: str | None = None,
        protects: bool = False,
        cycle_file: str | None = None,
        fail_file: str | None = None,
        lock_hold_file: str | None = None,
    ) -> None:
        # When set, ready() waits until this file exists (a slow first build, say).
        self.ready_file = ready_file
        # Pretends its helper could wipe the keys, so that the daemon can be Protected
        # (RECORDING_ARMER_PROTECTS=1: Suspend() then gets as far as logind).
        self.protects = protects
        # When set and the file exists, arm() reports its cycle as the helper would, before
        # PrepareForSleep(false): the daemon then emits CycleFinished.
        self.cycle_file = cycle_file
        self.fail_file = fail_file
        self.lock_hold_file = lock_hold_file
        self._cycle: tuple[CycleCallback, bool, dict[str, Any]] | None = None
        self.armed_with: list[tuple[str, ...]] = []
        self.disarmed = 0
        # watchdogs_off() calls: the daemon's word that the helper may freeze.
        self.watchdogs_told = 0
        self.sleeps: list[bool] = []
        self.configured: list[Config] = []
        self.on_status_change: Callable[[], None] | None = None

    def configure(self, config: Config) -> None:
        self.configured.append(config)

    def watch(
        self, on_status_change: Callable[[], None], on_recovered: CycleCallback | None = None
    ) -> None:
        self.on_status_change = on_status_change

    def status(self) -> list[CheckResult]:
        if self.protects:
            return [checks.check_helper(None)]
        return [checks.check_helper("armer 'recording' only records the cycle")]

    async def ready(self) -> None:
        while self.ready_file is not None and not Path(self.ready_file).exists():
            await asyncio.sleep(0.05)

    async def arm(
        self,
        devices: Sequence[LuksDevice],
        on_finished: CycleCallback,
        options: ArmOptions | None = None,
    ) -> None:
        if self.fail_file is not None and Path(self.fail_file).exists():
            raise CryptlockdError(Path(self.fail_file).read_text().strip())
        self.armed_with.append(tuple(d.name for d in devices))
        sleeps = (options or ArmOptions()).sleeps
        self.sleeps.append(sleeps)
        print(f"recording armer: armed with sleeps={sleeps}", file=sys.stderr, flush=True)
        if self.cycle_file is not None and Path(self.cycle_file).exists():
            cycle = json.loads(Path(self.cycle_file).read_text())
            self._cycle = (on_finished, bool(cycle["success"]), dict(cycle["record"]))

    async def watchdogs_off(self) -> None:
        self.watchdogs_told += 1

    async def disarm(self) -> bool:
        """As the real helper answers once it has run the sleep's cycle: busy, and its
        record follows (the daemon asks when PrepareForSleep(false) comes)."""
        self.disarmed += 1
        if self._cycle is not None:
            on_finished, success, record = self._cycle
            self._cycle = None
            asyncio.get_running_loop().call_soon(on_finished, success, record)
            return False
        return True

    def entry(self) -> RecordingEntry:
        return RecordingEntry(self)


class RecordingEntry:
    """Lock()'s cycle as the helper would run it: begins, then reports the cycle of
    RECORDING_ARMER_CYCLE_FILE (if any) as the record of the lock."""

    def __init__(self, armer: RecordingArmer) -> None:
        self.armer = armer

    async def begin(self, timeout: float) -> None:
        pass

    async def run(self, times: dict[str, float]) -> str:
        hold = self.armer.lock_hold_file
        while hold is not None and Path(hold).exists():
            await asyncio.sleep(0.05)
        if self.armer._cycle is None:
            return "the recording armer has no cycle to report"
        on_finished, success, record = self.armer._cycle
        self.armer._cycle = None
        on_finished(success, record)
        return ""


if __name__ == "__main__":
    armer = RecordingArmer(
        ready_file=os.environ.get("RECORDING_ARMER_READY_FILE"),
        protects=os.environ.get("RECORDING_ARMER_PROTECTS") == "1",
        cycle_file=os.environ.get("RECORDING_ARMER_CYCLE_FILE"),
        fail_file=os.environ.get("RECORDING_ARMER_FAIL_FILE"),
        lock_hold_file=os.environ.get("RECORDING_ARMER_LOCK_HOLD_FILE"),
    )
    sys.exit(main(sys.argv[1:], armer=armer))
