"""The cycle record: what happened, when, to which devices, and how the wipe was verified.

Times are protocol.boottime() seconds, the clock the daemon, the sleep entry and the helper
share, so their steps merge into one timeline.
"""

from __future__ import annotations

from cryptlockd.helper.protocol import boottime

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from typing import Any


def device_verified(v: dict[str, str]) -> bool:
    # "protected" is verify.is_protected's verdict (dm table and keyring); records from
    # before the keyring check only have the dm table part.
    if "protected" in v:
        return v["protected"] == "yes"
    return v.get("dm_table_key") == "zeroed"


class CycleRecord:
    def __init__(self, devices: list[str]) -> None:
        self.devices = list(devices)
        self.timeline: dict[str, float] = {}
        self.success = False
        self.reason = ""
        self.slept = False
        self.sleep_state = ""
        self.wrong_passphrases = 0
        self.suspended: list[str] = []
        self.resumed: list[str] = []
        # Left out at the prompt, or gone while asleep, and closed (resume.py).
        self.skipped: list[str] = []
        # Each time the prompt put the machine back to sleep, why (wake_watch: "esc",
        # "lid", "unanswered").
        self.slept_again: list[str] = []
        # per device: {"dm_table_key": "zeroed"|"present"|"error: ...", "keyring": ...}
        self.verification: dict[str, dict[str, str]] = {}
        self.problems: list[str] = []
        self.hardening: dict[str, str] = {}
        self.keyslots: dict[str, int] = {}
        # Per device, each keyslot the passphrase was tried on, in order (-1: any).
        self.keyslots_tried: dict[str, list[int]] = {}
        # Devices whose KDF and resume ran in a child process of their own (kdf.py).
        self.kdf_children: list[str] = []
        # "suspend", or "lock" for Lock(): the same cycle without the sleep write.
        self.action = "suspend"
        # The freed memory cleared after the page cache was dropped; -1: not asked to.
        self.page_cache_cleared_mib = -1

    def step(self, name: str, at: float | None = None) -> None:
        # A repeated step (a second prompt, say) keeps its first time and gets a numbered twin.
        key, n = name, 2
        while key in self.timeline:
            key, n = f"{name}#{n}", n + 1
        self.timeline[key] = boottime() if at is None else at

    def fail(self, reason: str) -> None:
        # The first reason is the cause; later ones are consequences, kept as problems.
        if not self.reason:
            self.reason = reason
        else:
            self.problems.append(reason)

    def unverified(self) -> list[str]:
        """The suspended devices whose wipe was not proven (dm table and keyring)."""
        return [d for d in self.suspended if not device_verified(self.verification.get(d, {}))]

    def verified(self) -> bool:
        return bool(self.suspended) and not self.unverified()

    def finish(self) -> None:
        all_suspended = set(self.suspended) == set(self.devices)
        all_resumed = set(self.resumed) | set(self.skipped) >= set(self.suspended)
        # A lock has no sleep to go through: reaching the prompt is its whole point.
        went = self.slept or (self.action == "lock" and "locked" in self.timeline)
        if went and all_suspended and not self.verified():
            self.fail("the wipe could not be verified for every device")
        for d in self.unverified():
            v = self.verification.get(d, {})
            self.problems.append(
                f"{d} was NOT protected: dm table key {v.get('dm_table_key')}, "
                f"keyring {v.get('keyring', 'not checked')}"
            )
        self.success = (
            went and all_suspended and all_resumed and self.verified() and not self.reason
        )
        self.step("finished")

    def as_dict(self) -> dict[str, Any]:
        start = min(self.timeline.values()) if self.timeline else 0.0
        return {
            "result": "success" if self.success else "failed",
            "success": self.success,
            "reason": self.reason,
            "problems": list(self.problems),
            "devices": list(self.devices),
            "suspended": list(self.suspended),
            "resumed": list(self.resumed),
            "skipped": list(self.skipped),
            "slept_again": list(self.slept_again),
            "slept": self.slept,
            "sleep_state": self.sleep_state,
            "wrong_passphrases": self.wrong_passphrases,
            "started_boottime": start,
            # step -> milliseconds since the first step
            "timeline_ms": {k: round((v - start) * 1000.0, 1) for k, v in self.timeline.items()},
            "verification": {d: dict(v) for d, v in self.verification.items()},
            "helper": dict(self.hardening),
            "keyslots": dict(self.keyslots),
            "keyslots_tried": {d: list(v) for d, v in self.keyslots_tried.items()},
            "kdf_children": list(self.kdf_children),
            "action": self.action,
            "page_cache_cleared_mib": self.page_cache_cleared_mib,
        }
