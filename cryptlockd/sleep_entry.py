"""ExecStart= of systemd-suspend.service (our drop-in): hand the sleep to the armed helper.

The helper sleeps only when told `sleep`. Before that message is sent, falling back to the
stock systemd-sleep is safe; after it, never (the machine must not sleep twice for one
request). The system-sleep hooks live on the root filesystem, so this process, not the
helper, runs them: `pre` before the helper freezes anything, `post` after it has thawed.
"""

from __future__ import annotations

import contextlib
import os
import socket
import sys
import time
from collections.abc import Sequence

from cryptlockd.helper import protocol
from cryptlockd.run import run
from cryptlockd.searchpath import merged_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from cryptlockd.helper.protocol import Message

# Highest precedence first (searchpath.py).
HOOK_DIRS = (
    "/etc/systemd/system-sleep",
    "/usr/local/lib/systemd/system-sleep",
    "/usr/lib/systemd/system-sleep",
)
STOCK_SLEEP = ("/usr/lib/systemd/systemd-sleep", "/lib/systemd/systemd-sleep")
HOOK_TIMEOUT = 90.0
CONNECT_TIMEOUT = 2.0
BEGIN_TIMEOUT = 10.0


def log(priority: int, text: str) -> None:
    # systemd-suspend.service's stdout goes to the journal; "<N>" sets the priority.
    print(f"<{priority}>cryptlockd-sleep: {text}", flush=True)


def boottime() -> float:
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def hook_programs(dirs: Sequence[str] = HOOK_DIRS) -> list[str]:
    """The executables of the hook directories, masked by name as systemd does."""
    try:
        found = merged_dir(dirs)
    except OSError as e:
        log(4, f"cannot read the sleep hooks: {e}")
        return []
    return [path for path in found if os.path.isfile(path) and os.access(path, os.X_OK)]


def run_hooks(phase: str, dirs: Sequence[str] = HOOK_DIRS) -> None:
    for hook in hook_programs(dirs):
        proc = run(
            [hook, phase, "suspend"],
            check=False,
            timeout=HOOK_TIMEOUT,
            env={"SYSTEMD_SLEEP_ACTION": "suspend"},
        )
        if proc.returncode != 0:
            log(4, f"hook {hook} {phase} failed ({proc.returncode}): {proc.stderr.strip()}")


def stock_sleep(why: str) -> int:
    log(2, f"this sleep is UNPROTECTED, the LUKS keys stay in RAM: {why}")
    for path in STOCK_SLEEP:
        if os.access(path, os.X_OK):
            os.execv(path, [path, "suspend"])
    log(3, "no systemd-sleep found")
    return 1


class Channel:
    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buffer = protocol.LineBuffer()
        self.pending: list[Message] = []

    def send(self, msg: Message) -> None:
        self.sock.sendall(protocol.encode(msg))

    def receive(self, timeout: float | None) -> Message | None:
        self.sock.settimeout(timeout)
        while not self.pending:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, OSError):
                return None
            if not data:
                return None
            self.pending.extend(self.buffer.feed(data))
        return self.pending.pop(0)


def connect(path: str = protocol.SOCKET_PATH) -> Channel | None:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    sock.settimeout(CONNECT_TIMEOUT)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        return None
    return Channel(sock)


def main(argv: list[str] | None = None) -> int:
    times: dict[str, float] = {"sleep_entry": boottime()}
    chan = connect()
    if chan is None:
        return stock_sleep(
            "no cryptlockd helper is armed (is cryptlockd running, and protecting any LUKS device?)"
        )
    try:
        chan.send({"op": protocol.OP_BEGIN})
    except OSError as e:
        return stock_sleep(f"the helper went away: {e}")
    reply = chan.receive(BEGIN_TIMEOUT)
    if reply is None or reply["op"] != protocol.OP_READY:
        why = reply.get("reason", reply["op"]) if reply else "no answer"
        return stock_sleep(f"the helper is not armed: {why}")
    times["hooks_pre_start"] = boottime()
    run_hooks("pre")
    times["hooks_pre_end"] = boottime()
    # From here on the helper owns the sleep: whatever happens, no second sleep.
    try:
        chan.send({"op": protocol.OP_SLEEP, "times": times})
    except OSError as e:
        log(2, f"could not hand the sleep to the helper: {e}; not sleeping")
        return 1
    result = chan.receive(None)
    post: dict[str, float] = {"hooks_post_start": boottime()}
    run_hooks("post")
    post["hooks_post_end"] = boottime()
    if result is None:
        log(2, "the helper went away during the cycle")
        return 1
    with contextlib.suppress(OSError):
        chan.send({"op": protocol.OP_FINISH, "times": post})
    done = chan.receive(30.0)
    ok = bool(result.get("slept")) and done is not None and bool(done.get("success"))
    if result.get("slept"):
        why = "" if ok else f": {result.get('reason') or 'see the cycle record'}"
        log(6 if ok else 4, "protected sleep done" + why)
    else:
        log(3, f"the protected sleep failed: {result.get('reason')}")
    return 0 if result.get("slept") else 1


if __name__ == "__main__":
    sys.exit(main())
