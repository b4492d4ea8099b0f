"""logind's rules for a suspend, applied to Suspend()'s caller (cryptlockd/daemon/
suspend_rights.py): which polkit actions, which inhibitors refuse, which flags."""

from __future__ import annotations

from cryptlockd.daemon.suspend_rights import Inhibitor, decide, describe
from cryptlockd.defs import (
    LOGIND_ROOT_CHECK_INHIBITORS,
    POLKIT_ACTION_LOGIN1_SUSPEND,
    POLKIT_ACTION_LOGIN1_SUSPEND_IGNORE_INHIBIT,
    POLKIT_ACTION_LOGIN1_SUSPEND_MULTIPLE_SESSIONS,
)

USER = 1000


def inhibitor(mode: str, uid: int = 0, what: str = "sleep", who: str = "apt") -> Inhibitor:
    return Inhibitor(what, who, "upgrading", mode, uid, 4242)


def test_nothing_in_the_way_asks_for_suspend_and_checks_inhibitors() -> None:
    v = decide(USER, [inhibitor("delay", what="sleep")], other_sessions=False)
    assert v.refused_by == ()
    assert v.actions == (POLKIT_ACTION_LOGIN1_SUSPEND,)
    assert v.flags == LOGIND_ROOT_CHECK_INHIBITORS


def test_other_users_sessions_ask_for_multiple_sessions_instead() -> None:
    v = decide(USER, [], other_sessions=True)
    assert v.actions == (POLKIT_ACTION_LOGIN1_SUSPEND_MULTIPLE_SESSIONS,)


def test_a_block_inhibitor_refuses_anyone_even_its_owner_and_root() -> None:
    for caller, holder in ((USER, 0), (USER, USER), (0, 0), (0, USER)):
        block = inhibitor("block", uid=holder)
        v = decide(caller, [block, inhibitor("delay")], other_sessions=False)
        assert v.refused_by == (block,), (caller, holder)


def test_only_sleep_inhibitors_count() -> None:
    shutdown = inhibitor("block", what="shutdown:idle")
    assert decide(USER, [shutdown], other_sessions=False).refused_by == ()
    both = inhibitor("block", what="shutdown:sleep")
    assert decide(USER, [both], other_sessions=False).refused_by == (both,)


def test_a_weak_inhibitor_of_another_uid_needs_ignore_inhibit() -> None:
    v = decide(USER, [inhibitor("block-weak", uid=0)], other_sessions=True)
    assert v.refused_by == ()
    assert v.actions == (
        POLKIT_ACTION_LOGIN1_SUSPEND_MULTIPLE_SESSIONS,
        POLKIT_ACTION_LOGIN1_SUSPEND_IGNORE_INHIBIT,
    )
    # logind would refuse us, root, for it with the flag: the caller was let through.
    assert v.flags == 0


def test_the_callers_own_weak_inhibitor_does_not_count() -> None:
    v = decide(USER, [inhibitor("block-weak", uid=USER)], other_sessions=False)
    assert v.refused_by == ()
    assert v.actions == (POLKIT_ACTION_LOGIN1_SUSPEND,)
    assert v.flags == 0


def test_root_is_refused_by_another_uids_weak_inhibitor() -> None:
    weak = inhibitor("block-weak", uid=USER)
    assert decide(0, [weak], other_sessions=False).refused_by == (weak,)
    assert decide(0, [inhibitor("block-weak", uid=0)], other_sessions=False).refused_by == ()


def test_the_error_names_who_why_and_pid_on_one_line() -> None:
    text = describe([Inhibitor("sleep", "apt\nget", "upgrading\x1b[31m", "block", 0, 77)])
    assert text == "'apt get' (pid 77, uid 0): upgrading [31m"
    many = describe([inhibitor("block", who=f"w{n}") for n in range(7)])
    assert many.count("pid 4242") == 5 and many.endswith("; and 2 more")


def test_from_dbus_reads_list_inhibitors_entries() -> None:
    got = Inhibitor.from_dbus(("sleep", "apt", "upgrading", "block", 0, 77))
    assert got == Inhibitor("sleep", "apt", "upgrading", "block", 0, 77)
