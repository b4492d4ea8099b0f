"""A umockdev testbed in its own process, driven over stdin/stdout (JSON lines).

umockdev's uevent sender must run under its LD_PRELOAD library, which the pytest process
cannot load after start; so the testbed lives here, under /usr/bin/python3 (Debian's gi)
with LD_PRELOAD=libumockdev-preload.so.0. Processes started with the same LD_PRELOAD and
UMOCKDEV_DIR=<root> see its /sys and receive its uevents through libudev (pyudev).

Commands: {"op": "add", "name", "parent", "attrs": [k, v, ...], "props": [k, v, ...]},
{"op": "uevent", "path", "action"}, {"op": "remove", "path"}. Each answers one line.
"""

from __future__ import annotations

import json
import sys

import gi

gi.require_version("UMockdev", "1.0")
from gi.repository import UMockdev  # noqa: E402


def main() -> None:
    testbed = UMockdev.Testbed.new()
    print(json.dumps({"root": testbed.get_root_dir()}), flush=True)
    for line in sys.stdin:
        cmd = json.loads(line)
        try:
            if cmd["op"] == "add":
                result = testbed.add_device(
                    "block", cmd["name"], cmd.get("parent"), cmd["attrs"], cmd["props"]
                )
            elif cmd["op"] == "uevent":
                testbed.uevent(cmd["path"], cmd["action"])
                result = None
            elif cmd["op"] == "remove":
                testbed.remove_device(cmd["path"])
                result = None
            else:
                raise ValueError(f"unknown op {cmd['op']!r}")
        except Exception as e:
            print(json.dumps({"error": repr(e)}), flush=True)
            continue
        print(json.dumps({"result": result}), flush=True)


if __name__ == "__main__":
    main()
