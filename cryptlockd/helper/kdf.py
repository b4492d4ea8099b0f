"""How the passphrase's KDF runs are spent at resume (issue 12).

Each keyslot tried is one full KDF run (Argon2id: seconds under load, and memory): the
keyslot that took the passphrase last time goes first (the daemon remembers it across
cycles, in the arm message's `keyslots`). Devices that may share the passphrase derive their
keys at once, in threads, within the memory held for the KDFs (the reserve, sized at arm for
all of them): Enter -> all resumed costs one KDF, not the sum. Only the derivation runs in
parallel; libcryptsetup's device-mapper side keeps global state (its dm context count), so
the resumes themselves go one at a time (`DM_LOCK`).
"""

from __future__ import annotations

import socket
import threading

from cryptlockd.helper.protocol import boottime

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Mapping, Sequence

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


def attempt_all(names: Sequence[str], attempt: Callable[[str], bool]) -> list[Outcome]:
    """`attempt(name)` for every name at once (one thread each, the first in the calling
    thread), the outcomes in the order of `names`. Returns when all are done."""
    outcomes = [Outcome() for _ in names]
    threads = [
        threading.Thread(target=_attempt, args=(attempt, name, out), daemon=True)
        for name, out in zip(names[1:], outcomes[1:], strict=True)
    ]
    for t in threads:
        t.start()
    if names:
        _attempt(attempt, names[0], outcomes[0])
    for t in threads:
        t.join()
    return outcomes
