"""The timeline PNG: one quiet cycle of each system on one time axis (seconds since the
request), the systems one above the other. Host moments for all three; for cryptlockd also
every step of its cycle record, placed on the host axis (figures.record_steps_on_host_axis)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from bench.figures import SYSTEMS, TITLES, CycleResult, record_steps_on_host_axis

HOST_STEPS = [
    ("request", None),
    ("QMP SUSPEND", "suspend"),
    ("QMP WAKEUP", "wakeup"),
    ("prompt seen", "prompt"),
    ("Enter typed", "enter"),
    ("usable", "usable"),
]


def steps(result: CycleResult) -> list[tuple[str, float]]:
    out = [
        (label, 0.0 if key is None else result.host[key])
        for label, key in HOST_STEPS
        if key is None or key in result.host
    ]
    out += sorted(record_steps_on_host_axis(result).items(), key=lambda kv: kv[1])
    return sorted(out, key=lambda kv: kv[1])


def draw(results: Sequence[CycleResult], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    chosen = {r.system: r for r in results if r.mode == "quiet"}
    rows = [s for s in SYSTEMS if s in chosen]
    fig, ax = plt.subplots(figsize=(16, 3.2 * len(rows) + 1))
    for y, system in enumerate(reversed(rows)):
        result = chosen[system]
        h = result.host
        # asleep, and the phases the host sees
        ax.broken_barh([(0, h["suspend"])], (y - 0.08, 0.16), color="tab:blue", alpha=0.35)
        ax.broken_barh(
            [(h["wakeup"], h["usable"] - h["wakeup"])],
            (y - 0.08, 0.16),
            color="tab:red",
            alpha=0.35,
        )
        ax.broken_barh(
            [(h["suspend"], h["wakeup"] - h["suspend"])], (y - 0.02, 0.04), color="grey", alpha=0.5
        )
        for i, (label, t) in enumerate(steps(result)):
            ax.plot([t], [y], "k|", markersize=14)
            ax.annotate(
                label,
                (t, y),
                xytext=(0, 10 + 9 * (i % 4)),
                textcoords="offset points",
                rotation=60,
                fontsize=7,
                ha="left",
                va="bottom",
            )
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels([TITLES[s] for s in reversed(rows)])
    ax.set_ylim(-0.5, len(rows) - 0.1)
    ax.set_xlabel(
        "seconds since the request (host clock); blue: request to QMP SUSPEND, grey: asleep "
        "(woken at once), red: QMP WAKEUP to usable"
    )
    ax.set_title("One quiet sleep cycle per system, bookworm guest under TCG (make bench)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
