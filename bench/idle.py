"""The idle cost of the daemon and of the idle helper, measured in the guest.

A script run once in the guest (python3, stdlib) samples, for each process, VmRSS from
/proc/<pid>/status, Pss from /proc/<pid>/smaps_rollup, and per thread (/proc/<pid>/task/*)
voluntary_ctxt_switches, nonvoluntary_ctxt_switches and the third field of schedstat (times
the thread was scheduled onto a CPU), at the start and at the end of a window in which nothing
talks to either process. A thread that sleeps and is woken counts one voluntary switch and one
run, so "wake-ups" here are the voluntary switches of all threads; runs are shown beside.
"""

from __future__ import annotations

import json
from typing import Any

from tests.vm.guest import Guest

UNITS = {"daemon": "cryptlockd.service", "idle helper": "cryptlockd-helper.service"}

SCRIPT = r"""
import glob, json, sys, time

def sample(pid):
    out = {"threads": 0, "vol": 0, "nonvol": 0, "runs": 0}
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            out["rss_kib"] = int(line.split()[1])
        elif line.startswith("VmLck:"):
            out["lck_kib"] = int(line.split()[1])
    try:
        for line in open(f"/proc/{pid}/smaps_rollup"):
            if line.startswith("Pss:"):
                out["pss_kib"] = int(line.split()[1])
    except OSError:
        pass
    for task in glob.glob(f"/proc/{pid}/task/*"):
        out["threads"] += 1
        for line in open(f"{task}/status"):
            if line.startswith("voluntary_ctxt_switches:"):
                out["vol"] += int(line.split()[1])
            elif line.startswith("nonvoluntary_ctxt_switches:"):
                out["nonvol"] += int(line.split()[1])
        try:
            out["runs"] += int(open(f"{task}/schedstat").read().split()[2])
        except OSError:
            pass
    return out

pids = json.loads(sys.argv[1])
seconds = float(sys.argv[2])
first = {name: sample(pid) for name, pid in pids.items()}
time.sleep(seconds)
last = {name: sample(pid) for name, pid in pids.items()}
print(json.dumps({"first": first, "last": last, "seconds": seconds}))
"""


async def measure(g: Guest, seconds: float = 60.0) -> dict[str, Any]:
    pids = {}
    for name, unit in UNITS.items():
        pid = (await g.run(f"systemctl show -p MainPID --value {unit}")).stdout.strip()
        pids[name] = int(pid)
    await g.write_file("/root/idle.py", SCRIPT.encode())
    out = await g.run(
        ["python3", "/root/idle.py", json.dumps(pids), str(seconds)], timeout=seconds + 60
    )
    result: dict[str, Any] = json.loads(out.stdout)
    result["pids"] = pids
    return result


def table(result: dict[str, Any]) -> str:
    minutes = result["seconds"] / 60
    lines = [
        "| process | pid | threads | VmRSS (MiB) | Pss (MiB) | VmLck (MiB) | voluntary "
        "switches / min (wake-ups) | involuntary / min | runs / min |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, first in result["first"].items():
        last = result["last"][name]
        pss = f"{last['pss_kib'] / 1024:.1f}" if "pss_kib" in last else "n/a"
        lck = f"{last['lck_kib'] / 1024:.1f}" if "lck_kib" in last else "n/a"
        lines.append(
            f"| {name} | {result['pids'][name]} | {last['threads']} | "
            f"{last['rss_kib'] / 1024:.1f} | {pss} | {lck} | "
            f"{(last['vol'] - first['vol']) / minutes:.1f} | "
            f"{(last['nonvol'] - first['nonvol']) / minutes:.1f} | "
            f"{(last['runs'] - first['runs']) / minutes:.1f} |"
        )
    return "\n".join(lines)
