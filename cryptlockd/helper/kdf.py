"""How the passphrase's KDF runs are spent at resume (issue 12).

Each keyslot tried is one full KDF run (Argon2id: seconds under load, and memory): the
keyslot that took the passphrase last time goes first (the daemon remembers it across
cycles, in the arm message's `keyslots`). Devices that may share the passphrase derive their
keys at once, in threads, within the memory held for the KDFs (the reserve, sized at arm for
all of them): Enter -> all resumed costs one KDF, not the sum. Only the derivation runs in
parallel; libcryptsetup's device-mapper side keeps global state (its dm context count), so
the resumes themselves go one at a time (`DM_LOCK`).

Where it can, each device but the first derives and resumes in a child process of its own
(`ChildAttempt`) rather than in a thread. Measured in the bookworm guest under TCG (issue
12), two Argon2 KDFs as threads of one process took 1.08x one alone, as two processes
1.02-1.03x (8 runs each); in protected cycles, two devices on one passphrase took 1.16x the
one-KDF cycle next to them with threads, 1.01x with a child (median of 3 and 6 pairs). Why
threads lose, we have not found. A child has its own libdevmapper state, so no `DM_LOCK` is
shared with it.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

from cryptlockd.helper.hardening import lock_on_fault, set_parent_death_signal
from cryptlockd.helper.protocol import boottime

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence
    from typing import Any

# Held around every libcryptsetup call that talks to device-mapper while threads derive keys.
DM_LOCK = threading.Lock()


def kernel_skcipher_name(spec: str) -> str | None:
    """The kernel's name for a keyslot's cipher spec ("aes-xts-plain64" -> "xts(aes)"),
    None for one it has no plain name for."""
    cipher, _, mode = spec.partition("-")
    mode = mode.split("-")[0].split(":")[0]
    if not cipher or not mode or cipher.startswith("capi"):
        return None
    return f"{mode}({cipher})"


def kernel_skcipher_usable(name: str) -> bool:
    """Whether this process can use the kernel cipher through an AF_ALG socket, as
    libcryptsetup does to decrypt a keyslot."""
    try:
        with socket.socket(socket.AF_ALG, socket.SOCK_SEQPACKET, 0) as s:
            s.bind(("skcipher", name))
    except OSError:
        return False
    return True


# LUKS2 keyslot priorities (libcryptsetup's crypt_keyslot_priority; `cryptsetup config
# --priority`). LUKS1 has none: every keyslot is normal.
PRIORITY_IGNORE = 0
PRIORITY_NORMAL = 1
PRIORITY_PREFER = 2


def keyslot_order(
    active: Sequence[int], last: int, priorities: Mapping[int, int] | None = None
) -> list[int]:
    """The keyslots to try, cheapest guess first: the one that worked last, then the
    others as libcryptsetup tries them for "any keyslot" (`prefer` before `normal`, each
    in slot order; `ignore` ones not at all, as `cryptsetup open` does not try them, unless
    there is nothing else: a prompt that can never succeed would keep the machine locked
    for good). A passphrase in the second keyslot costs two KDF runs, then one."""
    prio = priorities or {}
    slots = [s for s in active if prio.get(s, PRIORITY_NORMAL) != PRIORITY_IGNORE]
    slots = slots or list(active)
    slots.sort(key=lambda s: prio.get(s, PRIORITY_NORMAL) != PRIORITY_PREFER)
    if last in slots:
        slots.remove(last)
        slots.insert(0, last)
    return slots


def kdf_memory_at_once(memory: Mapping[str, int], asking: Collection[str]) -> int:
    """The KiB the KDFs may need at once after the wake: every device that asks for the
    passphrase derives together; a keyfile device's KDF runs alone."""
    together = sum(kib for name, kib in memory.items() if name in asking)
    return max([together, *memory.values()])


class KdfBudget:
    """The KiB the KDFs may hold at once (the reserve handed back just before). A KDF that
    does not fit waits until enough is back; one that alone is over the budget runs when
    nothing else does, so every device gets its turn."""

    def __init__(self, kib: int) -> None:
        self.kib = max(kib, 0)
        self._used = 0
        self._running = 0
        self._cond = threading.Condition()

    def acquire(self, kib: int) -> None:
        with self._cond:
            while self._running and self._used + kib > self.kib:
                self._cond.wait()
            self._used += kib
            self._running += 1

    def release(self, kib: int) -> None:
        with self._cond:
            self._used -= kib
            self._running -= 1
            self._cond.notify_all()


class Outcome:
    """What one device's attempt gave: `ok`, or the exception it raised; `at`, when."""

    __slots__ = ("at", "error", "ok")

    def __init__(self) -> None:
        self.ok = False
        # Any BaseException too: one raised in a thread must not vanish with it; the caller
        # takes in the others' outcomes first, then raises it (kdf.reraise).
        self.error: BaseException | None = None
        self.at = 0.0


def _attempt(attempt: Callable[[str], bool], name: str, out: Outcome) -> None:
    try:
        out.ok = attempt(name)
    except BaseException as e:
        out.error = e
    out.at = boottime()


def reraise(outcomes: Sequence[Outcome]) -> None:
    """Raises the first error that is not an Exception (KeyboardInterrupt, SystemExit), as
    the attempt would have raised it in the calling thread."""
    for out in outcomes:
        if out.error is not None and not isinstance(out.error, Exception):
            raise out.error


class ChildFailed(Exception):
    """The child gave no answer: it could not start, died, or wrote something else."""


class ChildError(Exception):
    """What went wrong in the child, as it said."""


class ChildAttempt:
    """One device's attempt in a forked child, which locks its new memory in RAM (as
    the helper's: the key it derives lives there) and dies with the helper. `run` runs in
    the child and returns what the parent needs, as JSON: {"ok": bool, "at": boottime,
    ...}, or raises (the child then answers {"error": text}). `apply` takes that answer
    in the parent and returns `ok`, or raises for an error; `finish` waits for it.

    Fork only while no other thread runs: a child of a process whose other thread holds a
    lock (libcryptsetup's, the C library's) would wait for it for good."""

    def __init__(
        self, run: Callable[[], dict[str, Any]], apply: Callable[[dict[str, Any]], bool]
    ) -> None:
        self.apply = apply
        parent = os.getpid()
        r, w = os.pipe()
        try:
            self.pid = os.fork()
        except OSError as e:
            os.close(r)
            os.close(w)
            raise ChildFailed(f"fork: {e}") from e
        if self.pid == 0:  # pragma: no cover - the child
            try:
                os.close(r)
                _serve_child(run, w, parent)
            finally:
                os._exit(0)
        os.close(w)
        self._r = r

    def finish(self) -> tuple[bool, float]:
        """Waits for the child: (ok, when it was done). Raises ChildFailed when it gave no
        answer, or what `apply` raises for the one it gave."""
        try:
            data = b""
            while chunk := os.read(self._r, 65536):
                data += chunk
        finally:
            os.close(self._r)
            _, status = os.waitpid(self.pid, 0)
        try:
            answer = json.loads(data)
        except ValueError:
            answer = None
        if not isinstance(answer, dict):
            raise ChildFailed(f"the child ended without an answer ({_exit_text(status)})")
        at = answer.get("at")
        return self.apply(answer), float(at) if isinstance(at, (int, float)) else boottime()


def _exit_text(status: int) -> str:
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit status {os.waitstatus_to_exitcode(status)}"


def _serve_child(
    run: Callable[[], dict[str, Any]], w: int, parent: int
) -> None:  # pragma: no cover
    """In the child: dies with the helper, locks new memory as it is touched (copies of
    the helper's pages too), runs `run`, writes its answer."""
    try:
        set_parent_death_signal(signal.SIGKILL, parent)
        lock_on_fault()
        answer = {**run(), "at": boottime()}
    except Exception as e:
        answer = {"error": str(e) or type(e).__name__}
    os.write(w, json.dumps(answer).encode())


def attempt_all(
    names: Sequence[str],
    attempt: Callable[[str], bool],
    children: Mapping[str, ChildAttempt] | None = None,
) -> list[Outcome]:
    """`attempt(name)` for every name at once, the outcomes in the order of `names`: the
    first in the calling thread, those in `children` in their child (started by the
    caller), the others in a thread each. A child that gave no answer gets its attempt
    here after all, in the calling thread. Returns when all are done."""
    children = children or {}
    outcomes = [Outcome() for _ in names]
    threads = [
        threading.Thread(target=_attempt, args=(attempt, name, out), daemon=True)
        for name, out in zip(names[1:], outcomes[1:], strict=True)
        if name not in children
    ]
    for t in threads:
        t.start()
    if names:
        _attempt(attempt, names[0], outcomes[0])
    for t in threads:
        t.join()
    for name, out in zip(names, outcomes, strict=True):
        if name in children:
            _finish_child(children[name], attempt, name, out)
    return outcomes


def _finish_child(
    child: ChildAttempt, attempt: Callable[[str], bool], name: str, out: Outcome
) -> None:
    try:
        out.ok, out.at = child.finish()
    except ChildFailed:
        # The device must still come back: the same attempt, in this process.
        _attempt(attempt, name, out)
    except BaseException as e:
        out.error = e
        out.at = boottime()
