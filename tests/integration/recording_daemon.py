"""The real daemon with an armer that only records: `python -m tests.integration.recording_daemon
<daemon arguments>`. The host has no device-mapper and no systemd to run the helper under, so
the integration tests start the daemon this way and check what it does around the helper.
The unit tests use RecordingArmer too. RECORDING_ARMER_READY_FILE: the armer is ready once
that file exists. RECORDING_ARMER_FAIL_FILE: while that file exists, arm() fails with its
content as the reason."""

from __future__ import annotations

import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from cryptlockd.daemon import checks
from cryptlockd.daemon.armer import CycleCallback
from cryptlockd.daemon.checks import CheckResult
from cryptlockd.daemon.config import Config
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.daemon.main import main
from cryptlockd.errors import CryptlockdError


class RecordingArmer:
    """Arms nothing and remembers the calls; its "helper" check fails, so the daemon is
    never Protected with it."""

    def __init__(self, ready_file: str | None = None, fail_file: str | None = None) -> None:
        # When set, ready() waits until this file exists (a slow first build, say).
        self.ready_file = ready_file
        self.fail_file = fail_file
        self.armed_with: list[tuple[str, ...]] = []
        self.disarmed = 0
        self.configured: list[Config] = []
        self.on_status_change: Callable[[], None] | None = None

    def configure(self, config: Config) -> None:
        self.configured.append(config)

    def watch(
        self, on_status_change: Callable[[], None], on_recovered: CycleCallback | None = None
    ) -> None:
        self.on_status_change = on_status_change

    def status(self) -> list[CheckResult]:
        return [checks.check_helper("armer 'recording' only records the cycle")]

    async def ready(self) -> None:
        while self.ready_file is not None and not Path(self.ready_file).exists():
            await asyncio.sleep(0.05)

    async def arm(self, devices: Sequence[LuksDevice], on_finished: CycleCallback) -> None:
        if self.fail_file is not None and Path(self.fail_file).exists():
            raise CryptlockdError(Path(self.fail_file).read_text().strip())
        self.armed_with.append(tuple(d.name for d in devices))

    async def disarm(self) -> bool:
        self.disarmed += 1
        return True


if __name__ == "__main__":
    armer = RecordingArmer(
        ready_file=os.environ.get("RECORDING_ARMER_READY_FILE"),
        fail_file=os.environ.get("RECORDING_ARMER_FAIL_FILE"),
    )
    sys.exit(main(sys.argv[1:], armer=armer))
