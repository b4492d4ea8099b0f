"""The sleep entry in Python: systemd-suspend.service's ExecStart= (our drop-in) where no C
compiler could build the native one, sleep_entry.c (Makefile, SLEEP_ENTRY). Both hand the
sleep to the armed helper by the same rules, and tests/unit/test_sleep_entry.py holds both
to them.

It runs between logind closing the delay lock and the sleep, so its start is on the critical
path: its script starts it with `python3 -I -S -B` (no site import, no .pth files), and it
imports only C parts of the standard library (not even `json` or `socket`: under TCG their
imports cost a third of a second), `searchpath` and the helper's `protocol`, `jsonline` and
`journal` (tests/unit/test_sleep_entry_closure.py keeps it so). Even so its start costs
0.1-0.3 s under TCG, against about 0.01 s for the C one.

The helper sleeps only when told `sleep`. Before that message is sent, falling back to the
stock systemd-sleep is safe; after it, never (the machine must not sleep twice for one
request). The system-sleep hooks live on the root filesystem, so this process, not the
helper, runs them: `pre` before the helper freezes anything, `post` after it has thawed.
"""

from __future__ import annotations

import os
import sys

from cryptlockd.helper import journal, jsonline, protocol
from cryptlockd.helper.journal import CRIT, ERR, INFO, WARNING
from cryptlockd.helper.protocol import boottime
from cryptlockd.searchpath import merged_dir

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence

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
DONE_TIMEOUT = 30.0


def log(priority: int, text: str) -> None:
    # systemd-suspend.service's stdout goes to the journal.
    journal.log(priority, text, sys.stdout, tag="cryptlockd-sleep: ")


# --root=DIR puts every path the entry uses under DIR: the host tests run it against a
# scripted helper.
_root = ""


def _under_root(path: str) -> str:
    return _root + path


def hook_programs(dirs: Sequence[str] = HOOK_DIRS) -> list[str]:
    """The executables of the hook directories, masked by name as systemd does."""
    try:
        found = merged_dir([_under_root(d) for d in dirs])
    except OSError as e:
        log(WARNING, f"cannot read the sleep hooks: {e}")
        return []
    return [path for path in found if os.path.isfile(path) and os.access(path, os.X_OK)]


def run_hooks(phase: str, dirs: Sequence[str] = HOOK_DIRS) -> None:
    hooks = hook_programs(dirs)
    if not hooks:
        return
    # Imported here: the subprocess wrapper brings logging and subprocess, which cost the
    # entry's start (under TCG, tenths of a second) and most machines have no hooks at all.
    import threading

    from cryptlockd.errors import CommandError
    from cryptlockd.run import run

    def one(hook: str) -> None:
        try:
            proc = run(
                [hook, phase, "suspend"],
                check=False,
                timeout=HOOK_TIMEOUT,
                env={"SYSTEMD_SLEEP_ACTION": "suspend"},
            )
        except (CommandError, OSError) as e:
            # A hook that hangs or cannot run must not hold up the sleep, nor the wake.
            log(WARNING, f"hook {hook} {phase} could not run: {e}")
            return
        if proc.returncode != 0:
            log(WARNING, f"hook {hook} {phase} failed ({proc.returncode}): {proc.stderr.strip()}")

    # All at once, as systemd-sleep runs them (and sleep_entry.c): one after another, a
    # few hooks cost the sum of their times on the way to the sleep. Started together,
    # each within HOOK_TIMEOUT of the same start.
    threads = [threading.Thread(target=one, args=(hook,), daemon=True) for hook in hooks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def leave_trace(why: str, path: str | None = None) -> None:
    """For the daemon, which cannot see this fallback otherwise: it reports the sleep as
    unprotected, with `why`, in LastCycle and CycleFinished (also when it was not running
    and finds the trace at its start). Written whole or not at all (rename)."""
    if path is None:
        path = _under_root(protocol.STOCK_SLEEP_TRACE)
    trace: protocol.StockSleepTrace = {"reason": why, "boottime": boottime()}
    tmp = f"{path}.{os.getpid()}"
    try:
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(jsonline.dumps(trace))
        os.replace(tmp, path)
    except OSError as e:
        # The sleep goes ahead all the same; only the report is lost.
        log(ERR, f"cannot leave the trace of this unprotected sleep in {path}: {e}")


def stock_sleep(why: str) -> int:
    log(CRIT, f"this sleep is UNPROTECTED, the LUKS keys stay in RAM: {why}")
    leave_trace(why)
    for path in map(_under_root, STOCK_SLEEP):
        if os.access(path, os.X_OK):
            os.execv(path, [path, "suspend"])
    log(ERR, "no systemd-sleep found")
    return 1


def _receive(chan: protocol.Channel, timeout: float | None) -> Message | None:
    """The helper's next message; None if it went away, or sent what we cannot read."""
    try:
        return chan.receive(timeout)
    except protocol.ProtocolError as e:
        log(ERR, f"a bad message from the helper: {e}")
        return None


def _why(msg: Message | None) -> str:
    """What the helper said went wrong."""
    if msg is None:
        return "no answer"
    if msg["op"] == protocol.OP_ERROR or msg["op"] == protocol.OP_RESUMED:
        return msg["reason"]
    return msg["op"]


def main(argv: list[str] | None = None) -> int:
    global _root
    times: dict[str, float] = {"sleep_entry": boottime()}
    for arg in sys.argv[1:] if argv is None else argv:
        if not arg.startswith("--root="):
            sys.stderr.write("usage: cryptlockd-sleep [--root=DIR]\n")
            return 2
        _root = arg.removeprefix("--root=")
    chan = protocol.connect(_under_root(protocol.SOCKET_PATH), CONNECT_TIMEOUT)
    if chan is None:
        return stock_sleep(
            "no cryptlockd helper is armed (is cryptlockd running, and protecting any LUKS device?)"
        )
    try:
        chan.send({"op": protocol.OP_BEGIN, "lock": False})
    except OSError as e:
        return stock_sleep(f"the helper went away: {e}")
    reply = _receive(chan, BEGIN_TIMEOUT)
    if reply is None or reply["op"] != protocol.OP_READY:
        return stock_sleep(f"the helper is not armed: {_why(reply)}")
    times["hooks_pre_start"] = boottime()
    run_hooks("pre")
    times["hooks_pre_end"] = boottime()
    # From here on the helper owns the sleep: whatever happens, no second sleep.
    try:
        chan.send({"op": protocol.OP_SLEEP, "times": times})
    except OSError as e:
        log(CRIT, f"could not hand the sleep to the helper: {e}; not sleeping")
        return 1
    result = _receive(chan, None)
    post: dict[str, float] = {"hooks_post_start": boottime()}
    run_hooks("post")
    post["hooks_post_end"] = boottime()
    if result is None:
        log(CRIT, "the helper went away during the cycle")
        return 1
    try:
        chan.send({"op": protocol.OP_FINISH, "times": post})
    except OSError as e:
        # Its answer (or its absence) below says how the cycle ended.
        log(WARNING, f"could not tell the helper the post hooks ran: {e}")
    done = _receive(chan, DONE_TIMEOUT)
    if result["op"] != protocol.OP_RESUMED or not result["slept"]:
        log(ERR, f"the protected sleep failed: {_why(result)}")
        return 1
    ok = done is not None and done["op"] == protocol.OP_DONE and done["success"]
    why = "" if ok else f": {result['reason'] or 'see the cycle record'}"
    log(INFO if ok else WARNING, "protected sleep done" + why)
    return 0


if __name__ == "__main__":
    sys.exit(main())
