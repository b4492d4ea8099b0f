"""The bench's figures: what one cycle yields, and the side-by-side tables (median, min, max
and the ratio of medians to stock). Pure functions; bench/cycle.py does the I/O."""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tests.vm import layout

SYSTEMS = ("stock", "debian", "cryptlockd")
TITLES = {
    "stock": "stock `systemctl suspend`",
    "debian": "Debian cryptsetup-suspend",
    "cryptlockd": "cryptlockd",
}
ROOT, DATA = layout.ROOT_DM_NAME, layout.DATA_DM_NAME

# Figures of the side-by-side table, in order (seconds). Host figures are measured on the
# host with time.monotonic and QMP events; record figures are intervals of the cycle record.
REQUEST_TO_SUSPEND = "request -> QMP SUSPEND (host)"
DELAY_LOCK = "delay-lock hold (record: PrepareForSleep -> released)"
WAKE_TO_PROMPT = "wake -> prompt (host: WAKEUP to prompt seen)"
ENTER_ROOT = f"Enter -> {ROOT} resumed"
ENTER_DATA = f"Enter -> {DATA} resumed"
ENTER_THAWED = "Enter -> thawed"
ENTER_USABLE = "Enter -> usable (host)"
WAKE_USABLE = "wake -> usable (host: WAKEUP to direct I/O through every device)"
FIGURES = [
    REQUEST_TO_SUSPEND,
    DELAY_LOCK,
    WAKE_TO_PROMPT,
    ENTER_ROOT,
    ENTER_DATA,
    ENTER_THAWED,
    ENTER_USABLE,
    WAKE_USABLE,
]

# cryptlockd's own steps, kept from the earlier bench (intervals of the cycle record).
INTERVALS = [
    ("PrepareForSleep -> arm request (daemon)", "prepare_for_sleep", "arm_requested"),
    ("arm request -> arm sent (daemon: sleep state, connect)", "arm_requested", "arm_sent"),
    ("arm sent -> helper starts arming", "arm_sent", "helper_arm"),
    ("  mlockall + not dumpable", "helper_arm", "helper_hardened"),
    ("  crypt_init_by_name of each device", "helper_hardened", "helper_devices_loaded"),
    ("  VT open", "helper_devices_loaded", "helper_armed"),
    ("helper armed -> the daemon reads it", "helper_armed", "armed"),
    ("the daemon reads armed -> delay lock released", "armed", "delay_lock_released"),
    (
        "  (KDF reserve faulted in by its thread, after armed: overlaps logind and the sync)",
        "helper_armed",
        "helper_kdf_reserved",
    ),
    (
        "  (service watchdogs off, after the release: overlaps logind)",
        "delay_lock_released",
        "watchdogs_switched",
    ),
    ("delay lock released -> sleep entry begins", "delay_lock_released", "begin"),
    ("begin -> synced (VT switch asked for; sync, nothing frozen yet)", "begin", "synced"),
    ("synced -> VT switched (what is left of the switch)", "synced", "vt_switched"),
    ("VT switched -> the daemon's word on the watchdogs", "vt_switched", "watchdogs_off"),
    ("watchdogs off -> cgroups frozen", "watchdogs_off", "frozen"),
    ("frozen -> file systems synced (syncfs)", "frozen", "filesystems_synced"),
    ("file systems synced -> devices suspended and verified", "filesystems_synced", "verified"),
    (
        "  file systems synced -> KDF reserve in (what was left of it)",
        "filesystems_synced",
        "kdf_reserve_ready",
    ),
    ("  rcu_expedited on -> devices suspended", "rcu_expedited", "rcu_restored"),
    ("verified -> sleep write", "verified", "sleep_write"),
    ("woke -> prompt", "woke", "prompt"),
    ("  woke -> root's header read again (before its prompt)", "woke", f"header_read:{ROOT}"),
    ("passphrase entered -> root resumed", "passphrase_entered", f"resumed:{ROOT}"),
    ("  passphrase entered -> key derived (the KDF)", "passphrase_entered", f"derived:{ROOT}"),
    ("  key derived -> resumed", f"derived:{ROOT}", f"resumed:{ROOT}"),
    ("root resumed -> data resumed (keyfile)", f"resumed:{ROOT}", f"resumed:{DATA}"),
    ("data resumed -> thawed", f"resumed:{DATA}", "thawed"),
    ("thawed -> finished", "thawed", "finished"),
]


@dataclass
class CycleResult:
    """One measured cycle. `host` holds host-side moments (seconds since the request, host
    monotonic clock); `record` is cryptlockd's cycle record (empty for the others)."""

    system: str
    mode: str  # "quiet" or "busy"
    host: dict[str, float]
    record: dict[str, Any] = field(default_factory=dict)
    index: int = 0  # the cycle's number within its system and mode, from 0

    def figures(self) -> dict[str, float]:
        h, out = self.host, {}
        if "suspend" in h:
            out[REQUEST_TO_SUSPEND] = h["suspend"]
        if "prompt" in h:
            out[WAKE_TO_PROMPT] = h["prompt"] - h["wakeup"]
        if "enter" in h:
            out[ENTER_USABLE] = h["usable"] - h["enter"]
        if "usable" in h:
            out[WAKE_USABLE] = h["usable"] - h["wakeup"]
        if self.record:
            t = self.record["timeline_ms"]
            out[DELAY_LOCK] = float(self.record["arm_seconds"])
            for name, step in (
                (ENTER_ROOT, f"resumed:{ROOT}"),
                (ENTER_DATA, f"resumed:{DATA}"),
                (ENTER_THAWED, "thawed"),
            ):
                if step in t and "passphrase_entered" in t:
                    out[name] = (t[step] - t["passphrase_entered"]) / 1000
        return out


def stats(values: Sequence[float]) -> tuple[float, float, float] | None:
    if not values:
        return None
    return statistics.median(values), min(values), max(values)


def cell(s: tuple[float, float, float] | None, stock: tuple[float, float, float] | None) -> str:
    if s is None:
        return "-"
    text = f"{s[0]:.2f} ({s[1]:.2f}-{s[2]:.2f})"
    if stock is not None and stock[0] > 0:
        text += f" **{s[0] / stock[0]:.2f}x**"
    return text


def side_by_side(results: Sequence[CycleResult], mode: str) -> str:
    """A Markdown table: one row per figure, one column per system; each cell the median
    (min-max) and, where stock has the figure, the ratio of medians to stock in bold."""
    by_system = {
        s: [r.figures() for r in results if r.system == s and r.mode == mode] for s in SYSTEMS
    }
    counts = {s: len(v) for s, v in by_system.items()}
    head = " | ".join(f"{TITLES[s]} (n={counts[s]})" for s in SYSTEMS)
    lines = [f"| figure (s) | {head} |", "| --- |" + " --- |" * len(SYSTEMS)]
    for fig in FIGURES:
        per = {s: stats([f[fig] for f in by_system[s] if fig in f]) for s in SYSTEMS}
        cells = " | ".join(cell(per[s], per["stock"] if s != "stock" else None) for s in SYSTEMS)
        lines.append(f"| {fig} | {cells} |")
    return "\n".join(lines)


def record_intervals(results: Sequence[CycleResult], mode: str) -> str:
    """cryptlockd's own steps (median, min, max), as in the earlier bench."""
    records = [r.record for r in results if r.system == "cryptlockd" and r.mode == mode]
    lines = ["| step (s) | median | min | max |", "| --- | --- | --- | --- |"]
    for label, a, b in INTERVALS:
        s = stats(
            [
                (rec["timeline_ms"][b] - rec["timeline_ms"][a]) / 1000
                for rec in records
                if a in rec["timeline_ms"] and b in rec["timeline_ms"]
            ]
        )
        row = "n/a | n/a | n/a" if s is None else f"{s[0]:.3f} | {s[1]:.3f} | {s[2]:.3f}"
        lines.append(f"| {label} | {row} |")
    return "\n".join(lines)


def record_steps_on_host_axis(result: CycleResult) -> dict[str, float]:
    """cryptlockd's record steps placed on the host axis (seconds since the request): the
    steps before the sleep aligned so that `sleep_write` falls on QMP SUSPEND, those after it
    so that `woke` falls on QMP WAKEUP (the guest's clock counts the sleep its own way)."""
    t: Mapping[str, float] = result.record.get("timeline_ms", {})
    h = result.host
    if "sleep_write" not in t or "woke" not in t:
        return {}
    before = h["suspend"] - t["sleep_write"] / 1000
    after = h["wakeup"] - t["woke"] / 1000
    return {
        step: (before if ms <= t["sleep_write"] else after) + ms / 1000 for step, ms in t.items()
    }


# The Argon2id cases (issue 12, acceptance 3): cryptlockd only, keyslots argon2id
# (layout.ARGON2_*). The quiet cycles run on the image's keyslots (slot 0 the boot keyfile's
# PBKDF2, slot 1 the passphrase); the forgotten, remembered and shared cases after
# bench/keyslots.py put a decoy argon2id keyslot in slot 1 and the passphrase in slot 2.
def _enter_to(rec: Mapping[str, Any], steps: Sequence[str]) -> float | None:
    t = rec.get("timeline_ms", {})
    if "passphrase_entered" not in t or not all(s in t for s in steps):
        return None
    return float(max(t[s] for s in steps) - t["passphrase_entered"]) / 1000


def _cases(
    results: Sequence[CycleResult], mode: str, first: bool | None = None
) -> list[CycleResult]:
    """cryptlockd's cycles of `mode` (only the first of them, or all but the first, when
    `first` says so)."""
    return [
        r
        for r in results
        if r.system == "cryptlockd"
        and r.mode == mode
        and (first is None or (r.index == 0) == first)
    ]


def _enter_values(
    results: Sequence[CycleResult], mode: str, steps: Sequence[str], first: bool | None = None
) -> list[float]:
    """Enter -> the last of `steps`, for cryptlockd's cycles of `mode`."""
    values = (_enter_to(r.record, steps) for r in _cases(results, mode, first))
    return [v for v in values if v is not None]


def tried_text(record: Mapping[str, Any]) -> str:
    """The record's keyslots_tried: "root 0,1,2; data 1" (each try one KDF run)."""
    tried = record.get("keyslots_tried") or {}
    return (
        "; ".join(
            f"{name} {','.join(str(s) for s in slots)}" for name, slots in sorted(tried.items())
        )
        or "none"
    )


def _tried_summary(cases: Sequence[CycleResult]) -> str:
    """The keyslots tried in these cycles, each different list once, with how many had it."""
    counts: dict[str, int] = {}
    for r in cases:
        text = tried_text(r.record)
        counts[text] = counts.get(text, 0) + 1
    return " / ".join(f"{text} (x{n})" for text, n in counts.items()) or "-"


def argon2_rows(results: Sequence[CycleResult]) -> list[tuple[str, list[float], str]]:
    """(label, values in s, keyslots tried) for each case; the first is the one-KDF
    reference."""
    root, both = [f"resumed:{ROOT}"], [f"resumed:{ROOT}", f"resumed:{DATA}"]

    def of(mode: str, steps: list[str], first: bool | None = None) -> tuple[list[float], str]:
        return _enter_values(results, mode, steps, first), _tried_summary(
            _cases(results, mode, first)
        )

    gaps = [
        (r.record["timeline_ms"][f"resumed:{DATA}"] - r.record["timeline_ms"][f"resumed:{ROOT}"])
        / 1000
        for r in _cases(results, "quiet", first=False)
    ]
    cases = [
        (
            "one KDF: Enter -> root resumed, keyslot 1 remembered (quiet cycles 2..n)",
            of("quiet", root, first=False),
        ),
        (
            "same, first cycle after the install (quiet cycle 1: nothing remembered yet, so "
            "the boot keyfile's PBKDF2 slot 0 is tried first)",
            of("quiet", root, first=True),
        ),
        (
            "decoy in slot 1, passphrase in slot 2, forgotten (daemon stopped and its "
            "keyslots.json removed before each cycle): Enter -> root resumed",
            of("forgotten", root),
        ),
        (
            "same, slot 2 remembered (no restart: one KDF): Enter -> root resumed",
            of("remembered", root),
        ),
        (
            "same, daemon restarted before each cycle (slot 2 remembered from its file: one "
            "KDF): Enter -> root resumed",
            of("restarted", root),
        ),
        (
            "root and data share the passphrase, both keyslots remembered: Enter -> all resumed",
            of("shared", both, first=False),
        ),
        (
            "same, first shared cycle (data's keyslot not yet remembered: its keyfile slot 0, "
            "PBKDF2, tried first)",
            of("shared", both, first=True),
        ),
        (
            "one KDF right after each later shared cycle (data back on its keyfile): "
            "Enter -> root resumed",
            of("paired", root),
        ),
    ]
    return [
        *((label, values, tried) for label, (values, tried) in cases),
        ("data by keyfile on root: root resumed -> data resumed (quiet cycles 2..n)", gaps, "-"),
    ]


def shared_over_paired(results: Sequence[CycleResult]) -> list[float]:
    """Each later shared cycle's Enter -> all resumed over the one-KDF cycle's Enter -> root
    resumed right after it (acceptance 3, drift of the host's speed left out)."""
    root, both = [f"resumed:{ROOT}"], [f"resumed:{ROOT}", f"resumed:{DATA}"]
    one = {r.index: _enter_to(r.record, root) for r in _cases(results, "paired")}
    ratios = []
    for r in _cases(results, "shared", first=False):
        shared, alone = _enter_to(r.record, both), one.get(r.index)
        if shared is not None and alone:
            ratios.append(shared / alone)
    return ratios


def forgotten_over_remembered(results: Sequence[CycleResult]) -> float | None:
    """Enter -> root resumed, median of the forgotten case over the remembered one's (two
    KDFs over one, with the decoy keyslot in front)."""
    root = [f"resumed:{ROOT}"]
    f = stats(_enter_values(results, "forgotten", root))
    r = stats(_enter_values(results, "remembered", root))
    return f[0] / r[0] if f and r and r[0] > 0 else None


def argon2_table(results: Sequence[CycleResult]) -> str:
    rows = argon2_rows(results)
    one = stats(rows[0][1])
    lines = [
        "| case | n | median (min-max) s | median / one KDF | keyslots tried (record) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for label, values, tried in rows:
        s = stats(values)
        ratio = f"{s[0] / one[0]:.2f}" if s and one and one[0] > 0 else "-"
        text = "-" if s is None else f"{s[0]:.2f} ({s[1]:.2f}-{s[2]:.2f})"
        lines.append(f"| {label} | {len(values)} | {text} | {ratio} | {tried} |")
    return "\n".join(lines)
