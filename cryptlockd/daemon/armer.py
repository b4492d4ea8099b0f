"""The seam between the daemon and the sleep-cycle helper.

On a genuine PrepareForSleep(true) the daemon calls `Armer.arm()` and closes its logind
delay lock only after it returns (or raises). When the helper finishes a cycle it calls
the `on_finished` callback with the cycle record, which becomes `LastCycle` and the
`CycleFinished` signal.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from cryptlockd.daemon.devices import LuksDevice

# A cycle record: plain Python values (str, int, float, bool, lists and dicts of them).
# The D-Bus layer turns it into a{sv}.
CycleRecord = dict[str, Any]
CycleCallback = Callable[[bool, CycleRecord], None]


class Armer(Protocol):
    async def arm(self, devices: Sequence[LuksDevice], on_finished: CycleCallback) -> None:
        """Return once the helper reports armed. Raise CryptlockdError when it cannot arm;
        the sleep then goes ahead unprotected, and says so."""

    async def disarm(self) -> None:
        """PrepareForSleep(false) came without a cycle (hibernate and friends, or an
        aborted sleep): stand the helper down."""


class RecordingArmer:
    """Used until a real helper is available: arms nothing, remembers the calls."""

    def __init__(self) -> None:
        self.armed_with: list[tuple[str, ...]] = []
        self.disarmed = 0

    async def arm(self, devices: Sequence[LuksDevice], on_finished: CycleCallback) -> None:
        self.armed_with.append(tuple(d.name for d in devices))

    async def disarm(self) -> None:
        self.disarmed += 1
