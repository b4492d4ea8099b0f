"""The bus: how many property reads and Check() calls per second the daemon answers, with one
client and with 100 at once, and their latency (median and p99).

Run it from the repository root; it needs no root and no QEMU:

    .venv/bin/python -m bench.bus [--seconds S] [--clients 1,100]

It starts what the host integration suite starts (tests/integration/conftest.py): a private
dbus-daemon, python-dbusmock's logind template, and the real daemon with the recording armer
on a fake LUKS2 machine with two devices. Each client is a connection of its own (dbus-fast)
that sends one call, waits for the reply, and sends the next, for S seconds; the clients run
at the same time in one asyncio loop of this process. A figure counts the replies of all
clients; the latency is each call's round trip. The daemon, the bus and the clients share the
machine's cores, so the figure is a floor for what the daemon alone could do.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

from dbus_fast import Message, MessageType, Variant
from dbus_fast.aio import MessageBus

from bench.inhibitor import cpu_model, host_daemon
from cryptlockd.defs import BUS_NAME, MANAGER_INTERFACE, OBJECT_PATH, PROPERTIES_INTERFACE

CALLS = {
    "Get(Protected)": (PROPERTIES_INTERFACE, "Get", "ss", [MANAGER_INTERFACE, "Protected"]),
    "GetAll": (PROPERTIES_INTERFACE, "GetAll", "s", [MANAGER_INTERFACE]),
    "Check()": (MANAGER_INTERFACE, "Check", "", []),
}


async def run_load(address: str, call: str, clients: int, seconds: float) -> list[float]:
    """Round-trip times of every call of `clients` connections, each calling in a loop."""
    interface, member, signature, body = CALLS[call]
    latencies: list[float] = []
    # Connections are made first, so that connecting is not counted.
    connected = [await MessageBus(bus_address=address).connect() for _ in range(clients)]
    until = time.monotonic() + seconds

    async def loop(bus: MessageBus) -> None:
        while time.monotonic() < until:
            t0 = time.perf_counter()
            reply = await bus.call(
                Message(
                    destination=BUS_NAME,
                    path=OBJECT_PATH,
                    interface=interface,
                    member=member,
                    signature=signature,
                    body=body,
                )
            )
            latencies.append(time.perf_counter() - t0)
            if reply is None or reply.message_type != MessageType.METHOD_RETURN:
                raise RuntimeError(f"{call}: {reply.body if reply else 'no reply'}")
            if member == "Get" and not isinstance(reply.body[0], Variant):
                raise RuntimeError(f"{call}: unexpected reply {reply.body!r}")

    try:
        await asyncio.gather(*(loop(b) for b in connected))
    finally:
        for b in connected:
            b.disconnect()
    return latencies


def percentile(sorted_values: Sequence[float], p: float) -> float:
    index = min(len(sorted_values) - 1, max(0, round(p / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def measure(directory: Path, client_counts: list[int], seconds: float) -> list[str]:
    rows: list[str] = []
    with host_daemon(directory) as (bus, _logind):
        for call in CALLS:
            for clients in client_counts:
                lat = sorted(asyncio.run(run_load(bus.address, call, clients, seconds)))
                rate = len(lat) / seconds
                rows.append(
                    f"| {call} | {clients} | {rate:.0f} | "
                    f"{statistics.median(lat) * 1000:.2f} | {percentile(lat, 99) * 1000:.2f} |"
                )
                print(rows[-1], flush=True)
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bus", description=__doc__)
    parser.add_argument("--seconds", type=float, default=5.0, help="per figure (default 5)")
    parser.add_argument(
        "--clients", default="1,100", help="concurrent clients, comma-separated (default 1,100)"
    )
    args = parser.parse_args(argv)
    counts = [int(c) for c in args.clients.split(",")]
    print("| call | clients | calls/s | median ms | p99 ms |")
    print("| --- | --- | --- | --- | --- |")
    with tempfile.TemporaryDirectory(prefix="cryptlockd-bench-") as tmp:
        measure(Path(tmp), counts, args.seconds)
    print(f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
