"""How long the host daemon holds logind's delay lock after PrepareForSleep(true): the time
a suspend waits for cryptlockd before it may go on. On the host the armer only records, so
the figure is the daemon's own share (signal to arm request to lock closed), without the
helper's arming that `make bench` measures in the guest.

Run it from the repository root; it needs no root and no QEMU:

    .venv/bin/python -m bench.inhibitor [--runs N]

It starts what the host integration suite starts (tests/integration/conftest.py): a private
dbus-daemon, python-dbusmock's logind template, and the real daemon with the recording armer
on a fake LUKS2 machine. Each run asks the mock to emit PrepareForSleep(true) and polls
ListInhibitors every millisecond until our lock is gone (so a figure includes a D-Bus round
trip or two), then sends PrepareForSleep(false) and waits until the daemon is idle with its
lock taken again. It prints the median, min and max, and the machine it ran on.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from cryptlockd.defs import BUS_NAME, MANAGER_INTERFACE, OBJECT_PATH, PROPERTIES_INTERFACE
from tests.integration.conftest import (
    LogindMock,
    Reporter,
    SystemBus,
    launch_daemon,
    make_daemon_root,
    make_luks_system,
    start_bus,
)
from tests.wait import wait_until


def state(bus: SystemBus) -> str:
    obj = bus.conn.get_object(BUS_NAME, OBJECT_PATH, introspect=False)
    return str(obj.Get(MANAGER_INTERFACE, "State", dbus_interface=PROPERTIES_INTERFACE))


def hold_once(bus: SystemBus, logind: LogindMock) -> float:
    """Seconds from PrepareForSleep(true) until our delay lock is released."""
    t0 = time.monotonic()
    logind.prepare_for_sleep(True)
    wait_until(
        lambda: not logind.our_inhibitors(), 5.0, interval=0.001, message="inhibitor released"
    )
    held = time.monotonic() - t0
    assert state(bus) == "armed", "the daemon let the lock go without arming"
    logind.prepare_for_sleep(False)
    wait_until(logind.our_inhibitors, message="inhibitor taken again")
    wait_until(lambda: state(bus) == "idle", message="State back to idle")
    return held


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


@contextlib.contextmanager
def host_daemon(directory: Path) -> Iterator[tuple[SystemBus, LogindMock]]:
    """What the host integration suite starts: a private bus, logind's mock, and the real
    daemon (recording armer) on a fake LUKS2 machine, its inhibitor taken. The processes'
    logs go to stderr when the body fails."""
    reporter = Reporter()
    with contextlib.ExitStack() as stack:
        try:
            bus = start_bus(directory, reporter)
            stack.callback(bus.close)
            logind = LogindMock(bus, reporter)
            stack.callback(logind.stop)
            root = make_daemon_root(directory)
            args = make_luks_system(directory, root).daemon_args()
            daemon = launch_daemon(bus, reporter, root, directory / "cryptlockd.log", *args)
            stack.callback(daemon.stop)
            wait_until(logind.our_inhibitors, message="inhibitor taken at start")
            yield bus, logind
        except BaseException:
            for p in reporter.processes:
                print(f"--- log of {p.name} (pid {p.pid})\n{p.log()}", file=sys.stderr)
            raise


def measure(directory: Path, runs: int) -> list[float]:
    with host_daemon(directory) as (bus, logind):
        return [hold_once(bus, logind) for _ in range(runs)]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.inhibitor", description=__doc__)
    parser.add_argument("--runs", type=int, default=20, help="sleeps to time (default 20)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cryptlockd-bench-") as tmp:
        holds = measure(Path(tmp), args.runs)
    ms = sorted(h * 1000 for h in holds)
    print(
        f"delay lock held after PrepareForSleep(true), {len(ms)} runs: "
        f"median {statistics.median(ms):.1f} ms, min {ms[0]:.1f} ms, max {ms[-1]:.1f} ms"
    )
    print(f"machine: {os.cpu_count()} CPUs (nproc {len(os.sched_getaffinity(0))}), {cpu_model()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
