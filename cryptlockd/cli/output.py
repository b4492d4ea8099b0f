"""cryptlockctl's output: values off the bus made plain, and their text and JSON forms.
No I/O but the stream it is handed."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, TextIO

from dbus_fast import Variant

from cryptlockd.defs import DEVICE_FIELDS

__all__ = [
    "Output",
    "describe_cycle",
    "device_dict",
    "format_changes",
    "format_check",
    "format_devices",
    "format_status",
    "plain",
    "status_dict",
]


class Output:
    """Where a command's result goes: its text, or its data as one JSON line."""

    def __init__(self, as_json: bool, stream: TextIO) -> None:
        self.json = as_json
        self.stream = stream

    def emit(self, human: str, data: Any) -> None:
        if self.json:
            self.stream.write(json.dumps(data, sort_keys=True) + "\n")
        else:
            self.stream.write(human + "\n")
        self.stream.flush()


# ---- values off the bus -------------------------------------------------------------


def plain(value: Any) -> Any:
    """Variants, structs and arrays off the bus as JSON-ready Python values."""
    if isinstance(value, Variant):
        return plain(value.value)
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, bytes):
        return value.hex()
    return value


def device_dict(struct: Sequence[Any]) -> dict[str, Any]:
    return dict(zip(DEVICE_FIELDS, plain(struct), strict=True))


def status_dict(props: dict[str, Any]) -> dict[str, Any]:
    out = {k: plain(v) for k, v in sorted(props.items())}
    if "Devices" in out:
        out["Devices"] = [device_dict(d) for d in props["Devices"]]
    return out


# ---- text ---------------------------------------------------------------------------


def yes_no(value: Any) -> str:
    return "yes" if value else "no"


def describe_cycle(record: dict[str, Any]) -> str:
    if not record:
        return "none yet"
    result = record.get("result") or ("success" if record.get("success") else "failed")
    parts = [str(result)]
    if record.get("action") == "lock":
        parts.insert(0, "lock:")
    if record.get("reason"):
        parts.append(f"({record['reason']})")
    devices = record.get("devices")
    if isinstance(devices, list):
        parts.append(f"[{', '.join(map(str, devices)) or 'no devices'}]")
    for key in ("finished", "finished_at", "time"):
        if record.get(key):
            parts.append(f"at {record[key]}")
            break
    return " ".join(parts)


def format_status(status: dict[str, Any]) -> str:
    devices = status.get("Devices", [])
    names = ", ".join(d["name"] for d in devices)
    problems = status.get("Problems", [])
    lines = [
        f"Protected:  {yes_no(status.get('Protected'))}",
        f"Problems:   {'none' if not problems else problems[0]}",
        *(f"            {p}" for p in problems[1:]),
        f"State:      {status.get('State', '?')}",
        f"Enabled:    {yes_no(status.get('Enabled'))}",
        f"Devices:    {len(devices)}" + (f" ({names})" if names else ""),
        f"Last cycle: {describe_cycle(status.get('LastCycle') or {})}",
        f"Version:    {status.get('Version', '?')}",
    ]
    return "\n".join(lines)


def format_devices(devices: list[dict[str, Any]]) -> str:
    if not devices:
        return "No active LUKS devices."
    header = ("NAME", "TYPE", "BACKING", "ROOT", "SUSPENDED", "KEY", "HOLDERS", "UUID")
    rows = [header] + [
        (
            d["name"],
            d["luks_type"],
            d["backing_device"] or "-",
            yes_no(d["holds_root"]),
            yes_no(d["suspended"]),
            d["key_source"],
            ",".join(d["holders"]) or "-",
            d["uuid"],
        )
        for d in devices
    ]
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(str(c).ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def format_check(results: list[tuple[str, bool, str]]) -> str:
    width = max((len(n) for n, _, _ in results), default=0)
    lines = [f"{'ok  ' if ok else 'FAIL'}  {n.ljust(width)}  {d}".rstrip() for n, ok, d in results]
    failed = sum(1 for _, ok, _ in results if not ok)
    lines.append(
        f"{failed} of {len(results)} checks failed."
        if failed
        else f"All {len(results)} checks passed."
    )
    return "\n".join(lines)


def format_changes(changed: dict[str, Any]) -> str:
    parts = []
    for key, value in sorted(changed.items()):
        if key == "Devices":
            parts.append(f"Devices=[{', '.join(d['name'] for d in value)}]")
        elif key == "LastCycle":
            parts.append(f"LastCycle=({describe_cycle(value)})")
        elif isinstance(value, bool):
            parts.append(f"{key}={yes_no(value)}")
        elif isinstance(value, list):
            parts.append(f"{key}=[{'; '.join(map(str, value))}]")
        else:
            parts.append(f"{key}={value}")
    return " ".join(parts)
