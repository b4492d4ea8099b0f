"""Suspend() with the caller's rights (issue 10, defect 8).

The daemon asks logind to suspend as root, and logind checks its rules against the one who
asks: for root, nothing but a block inhibitor when asked to check them. So before it asks,
the daemon applies to its caller what logind's verify_shutdown_creds() (src/login/
logind-dbus.c) would have applied had the caller asked logind itself:

- other users' sessions: polkit org.freedesktop.login1.suspend-multiple-sessions;
- a block inhibitor on "sleep": refused, and the error names it (who, why, pid). A
  "block-weak" one held by the caller's own uid does not count, and one held by another
  uid needs org.freedesktop.login1.suspend-ignore-inhibit; for a root caller it refuses,
  as logind refuses root with SD_LOGIND_ROOT_CHECK_INHIBITORS. (That is logind since 257,
  which added block-weak; before it, 252 included, a "block" inhibitor of the caller's
  own uid did not count and polkit's ignore-inhibit action let an admin past the others.
  The newer, stricter rule is the one kept on every release: Suspend() has no "skip
  inhibitors" flag);
- otherwise: polkit org.freedesktop.login1.suspend.

Then logind is called with SuspendWithFlags(SD_LOGIND_ROOT_CHECK_INHIBITORS), so that an
inhibitor taken since is still applied by logind itself, unless a block-weak inhibitor was
let through above (logind would refuse root for it).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass

from dbus_fast.aio import MessageBus

from cryptlockd.bus import RemoteInterface, bus_daemon
from cryptlockd.daemon import polkit
from cryptlockd.daemon.log import MessageId, event
from cryptlockd.defs import (
    LOGIND_BUS_NAME,
    LOGIND_MANAGER_INTERFACE,
    LOGIND_PATH,
    LOGIND_ROOT_CHECK_INHIBITORS,
    LOGIND_SESSION_INTERFACE,
    POLKIT_ACTION_LOGIN1_SUSPEND,
    POLKIT_ACTION_LOGIN1_SUSPEND_IGNORE_INHIBIT,
    POLKIT_ACTION_LOGIN1_SUSPEND_MULTIPLE_SESSIONS,
)
from cryptlockd.errors import Inhibited, LogindError, RemoteError

__all__ = ["Inhibitor", "Verdict", "caller_rights", "decide", "describe"]

log = logging.getLogger(__name__)

# At most this many inhibitors are named in one error (a one-line message).
NAMED_MAX = 5


@dataclass(frozen=True)
class Inhibitor:
    """One entry of logind's ListInhibitors, a(ssssuu)."""

    what: str
    who: str
    why: str
    mode: str
    uid: int
    pid: int

    @classmethod
    def from_dbus(cls, entry: Sequence[object]) -> Inhibitor:
        what, who, why, mode, uid, pid = entry
        return cls(str(what), str(who), str(why), str(mode), int(str(uid)), int(str(pid)))

    @property
    def blocks_sleep(self) -> bool:
        return "sleep" in self.what.split(":") and self.mode in ("block", "block-weak")

    def describe(self) -> str:
        return f"{_printable(self.who)!r} (pid {self.pid}, uid {self.uid}): {_printable(self.why)}"


def _printable(text: str, limit: int = 200) -> str:
    # The text comes from whoever took the inhibitor: one line, bounded.
    return "".join(c if c.isprintable() else " " for c in text)[:limit]


def describe(inhibitors: Sequence[Inhibitor]) -> str:
    named = "; ".join(i.describe() for i in inhibitors[:NAMED_MAX])
    more = len(inhibitors) - NAMED_MAX
    return named + (f"; and {more} more" if more > 0 else "")


@dataclass(frozen=True)
class Verdict:
    refused_by: tuple[Inhibitor, ...]  # not empty: refused, whatever polkit says
    actions: tuple[str, ...]  # the polkit actions the caller needs, all of them
    flags: int  # for logind's SuspendWithFlags()


def decide(caller_uid: int, inhibitors: Sequence[Inhibitor], other_sessions: bool) -> Verdict:
    """What logind would ask of `caller_uid` for a suspend (the module's rules)."""
    blocking = [i for i in inhibitors if i.blocks_sleep]
    strong = [i for i in blocking if i.mode == "block"]
    weak = [i for i in blocking if i.mode == "block-weak" and i.uid != caller_uid]
    refused_by = strong or (weak if caller_uid == 0 else [])
    actions: list[str] = []
    if other_sessions:
        actions.append(POLKIT_ACTION_LOGIN1_SUSPEND_MULTIPLE_SESSIONS)
    if weak:
        actions.append(POLKIT_ACTION_LOGIN1_SUSPEND_IGNORE_INHIBIT)
    if not other_sessions and not weak:
        actions.append(POLKIT_ACTION_LOGIN1_SUSPEND)
    # Any weak one, even the caller's own, would make logind refuse us, root, with the flag.
    weak_any = any(i.mode == "block-weak" for i in blocking)
    flags = 0 if weak_any else LOGIND_ROOT_CHECK_INHIBITORS
    return Verdict(tuple(refused_by), tuple(actions), flags)


async def caller_rights(
    bus: MessageBus, sender: str | None, timeout: float, polkit_timeout: float
) -> int:
    """Check the caller of Suspend() against logind's rules for a suspend; returns the
    flags for SuspendWithFlags(). Raises Inhibited, NotAuthorized, or LogindError when
    logind cannot be asked (fails closed)."""
    if not sender:
        raise LogindError("no sender to check logind's rules for")
    login1 = RemoteInterface(bus, LOGIND_BUS_NAME, LOGIND_PATH, LOGIND_MANAGER_INTERFACE, timeout)
    try:
        uid = int(
            (await bus_daemon(bus, timeout).call("GetConnectionUnixUser", "s", [sender])).body[0]
        )
        listed = (await login1.call("ListInhibitors")).body[0]
        inhibitors = [Inhibitor.from_dbus(i) for i in listed]
        other_sessions = await _other_users_sessions(bus, login1, uid, timeout)
    except (RemoteError, ValueError, TypeError, IndexError) as e:
        raise LogindError(f"cannot check logind's rules for this suspend: {e}") from e
    verdict = decide(uid, inhibitors, other_sessions)
    if verdict.refused_by:
        text = describe(verdict.refused_by)
        log.warning(
            "suspend requested by %s (uid %d) refused: blocked by %s",
            sender,
            uid,
            text,
            extra=event(MessageId.SUSPEND_REQUESTED, SENDER=sender, RESULT="inhibited"),
        )
        raise Inhibited(f"a block inhibitor holds off sleep: {text}")
    for action in verdict.actions:
        await polkit.require(bus, sender, action, polkit_timeout)
    return verdict.flags


async def _other_users_sessions(
    bus: MessageBus, login1: RemoteInterface, uid: int, timeout: float
) -> bool:
    """Whether another user has a login session (logind's have_multiple_sessions(): the
    user classes count; greeters, lock screens, managers and background sessions do not)."""
    for _id, session_uid, _user, _seat, path in (await login1.call("ListSessions")).body[0]:
        if int(session_uid) == uid:
            continue
        session = RemoteInterface(
            bus, LOGIND_BUS_NAME, str(path), LOGIND_SESSION_INTERFACE, timeout
        )
        try:
            session_class = str(await session.get("Class"))
        except RemoteError:
            continue  # the session ended meanwhile
        if session_class.startswith("user"):
            return True
    return False
