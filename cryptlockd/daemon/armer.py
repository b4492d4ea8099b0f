"""The seam between the daemon and whatever runs the sleep cycle for it.

On a genuine PrepareForSleep(true) the manager calls `Armer.arm()` and closes its logind
delay lock only after it returns (or raises). When the helper finishes a cycle, the armer
calls the `on_finished` callback with the cycle record, which becomes `LastCycle` and the
`CycleFinished` signal. The daemon's armer is helper_armer.HelperArmer; the tests bring
their own (tests/integration/recording_daemon.py).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from cryptlockd.daemon.checks import CheckResult
from cryptlockd.daemon.config import Config
from cryptlockd.daemon.devices import LuksDevice

__all__ = ["ArmOptions", "Armer", "CycleCallback", "CycleEntry", "CycleRecord"]

# A cycle record: plain Python values (str, int, float, bool, lists and dicts of them).
# The D-Bus layer turns it into a{sv}.
CycleRecord = dict[str, Any]
CycleCallback = Callable[[bool, CycleRecord], None]


@dataclass
class ArmOptions:
    """How to arm, besides the devices."""

    # False for Lock(): the cycle without the sleep write, started through entry().
    sleeps: bool = True
    # The caller's own moments (boottime), kept by reference and put on the record's
    # timeline with the armer's, including those added after arm() returns.
    steps: dict[str, float] = field(default_factory=dict)
    # The helper freezes nothing until watchdogs_off() (or a few seconds have passed).
    watchdogs_pending: bool = False
    # Called the moment the helper says armed, before arm() returns (an armer may also
    # never call it).
    on_armed: Callable[[], None] | None = None


class CycleEntry(Protocol):
    """What starts and follows an armed helper's cycle for Lock(), in the sleep entry's
    stead (lock_entry.HelperEntry)."""

    async def begin(self, timeout: float) -> None:
        """Return once the cycle has begun (the helper is on its VT); raise LockFailed when
        it does not."""

    async def run(self, times: dict[str, float]) -> str:
        """The cycle to its end (devices back, thawed): what went wrong, "" if nothing.
        The record still comes to arm()'s `on_finished`."""


class Armer(Protocol):
    def configure(self, config: Config) -> None:
        """A (re)loaded configuration. The first call may start preparing for the first
        sleep (the helper's RAM filesystem), in the background."""

    def watch(
        self, on_status_change: Callable[[], None], on_recovered: CycleCallback | None = None
    ) -> None:
        """Call `on_status_change` in the event loop whenever what status() says may have
        changed on its own (a background build finishing), and `on_recovered` with the
        record of a cycle whose helper died and was recovered (SPEC 2.8), found at start."""

    def status(self) -> list[CheckResult]:
        """Whether the armer could protect the next sleep, as self-check lines for Check()
        and Problems (the "helper" line, and whatever else it depends on)."""

    async def ready(self) -> None:
        """Return once the next sleep would be protected as far as the armer can make it
        (at start: the helper's RAM filesystem built and its idle helper listening), or
        once it knows it cannot. The daemon tells systemd READY=1 after this, or after a
        bounded wait."""

    async def arm(
        self,
        devices: Sequence[LuksDevice],
        on_finished: CycleCallback,
        options: ArmOptions | None = None,
    ) -> None:
        """Return once the helper reports armed (ArmOptions says how). Raise
        CryptlockdError when it cannot arm; the sleep then goes ahead unprotected, and
        says so. The manager bounds it and may cancel it; it then calls disarm(), which
        must also stand down a helper that arms after all (or, should that helper run the
        cycle, pass its record on)."""

    async def watchdogs_off(self) -> None:
        """Tell the armed helper that PID 1's service watchdogs are off (or that they
        could not be switched): its cycle may freeze. Never raises."""

    async def disarm(self) -> bool:
        """The sleep is over without a record (PrepareForSleep(false) without a cycle,
        logind gone, the deadline), or arming failed: stand the helper down, unless it is
        running a cycle. Returns within a second or two: True once no helper of ours is
        armed (a record that came meanwhile went to `on_finished` first); False when the
        helper is busy with a cycle, whose record will still go to `on_finished`."""

    def entry(self) -> CycleEntry:
        """For Lock(): what begins the armed helper's cycle and follows it to its end."""
