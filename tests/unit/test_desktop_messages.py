"""What cryptlockd-notify says for a finished cycle and for Protected turning false."""

from __future__ import annotations

from cryptlockd.desktop.messages import (
    NEXT_SLEEP_SUMMARY,
    WIPED_SUMMARY,
    ProtectionWatch,
    Urgency,
    cycle_notice,
    unprotected_notice,
)


def test_verified_cycle() -> None:
    record = {"result": "success", "devices": ["root", "home"], "suspended": ["root", "home"]}
    notice = cycle_notice(True, record)
    assert notice.summary == "Disk keys were wiped while asleep (verified)" == WIPED_SUMMARY
    assert notice.body == "Devices: root, home"
    assert notice.urgency == Urgency.NORMAL


def test_a_lock_is_called_a_lock() -> None:
    record = {"result": "success", "action": "lock", "suspended": ["root"]}
    assert cycle_notice(True, record).summary == "Disk keys were wiped while locked (verified)"
    failed = {"result": "failed", "action": "lock", "reason": "cannot lock: no helper"}
    notice = cycle_notice(False, failed)
    assert notice.summary == "This lock did NOT wipe the disk keys: cannot lock: no helper"
    assert notice.urgency == Urgency.CRITICAL


def test_failed_cycle_names_its_reason() -> None:
    record = {"result": "failed", "reason": "freezing timed out", "problems": ["x was busy"]}
    notice = cycle_notice(False, record)
    assert notice.summary == "This sleep was NOT protected: freezing timed out"
    assert notice.body == "x was busy"
    assert notice.urgency == Urgency.CRITICAL


def test_failed_cycle_without_reason_takes_the_first_problem() -> None:
    notice = cycle_notice(False, {"problems": ["root was NOT protected", "second"]})
    assert notice.summary == "This sleep was NOT protected: root was NOT protected"
    assert notice.body == "second"
    assert cycle_notice(False, {}).summary == "This sleep was NOT protected: no reason given"


def test_a_success_flag_is_what_counts() -> None:
    # A record that says success but comes with success=false is not a wipe.
    assert cycle_notice(False, {"result": "success"}).urgency == Urgency.CRITICAL


def test_recovered_cycle_says_so() -> None:
    record = {"reason": "the helper died mid-cycle; recovered", "recovered": True}
    notice = cycle_notice(False, record)
    assert "recovered" in notice.summary
    assert "helper died and was recovered" in notice.body


def test_daemon_text_is_one_line_and_not_markup() -> None:
    reason = "a\nvery   long\treason " + "x" * 300
    notice = cycle_notice(False, {"reason": reason, "problems": ["<b>dev</b> & co"]})
    assert "\n" not in notice.summary and "\t" not in notice.summary
    assert notice.summary.startswith("This sleep was NOT protected: a very long reason x")
    assert len(notice.summary) < 260 and notice.summary.endswith("…")
    assert notice.body == "&lt;b&gt;dev&lt;/b&gt; &amp; co"


def test_unprotected_notice_lists_the_problems() -> None:
    notice = unprotected_notice(["protection disabled", "", "no helper"])
    assert notice.summary == NEXT_SLEEP_SUMMARY
    assert notice.body == "protection disabled\nno helper"
    assert notice.urgency == Urgency.CRITICAL
    assert unprotected_notice([]).body == "no reason given"


def test_protection_watch_warns_once_per_turn() -> None:
    watch = ProtectionWatch()
    assert watch.update(True, []) is None
    first = watch.update(False, ["protection disabled"])
    assert first is not None and first.body == "protection disabled"
    # Still false: a repeated change, other problems, the daemon restarting.
    assert watch.update(False, ["protection disabled"]) is None
    assert watch.update(False, ["something else"]) is None
    # True again, then false: a new turn.
    assert watch.update(True, []) is None
    assert watch.update(False, ["no LUKS device"]) is not None


def test_protection_watch_false_at_start_is_a_turn() -> None:
    watch = ProtectionWatch()
    assert watch.update(False, ["no LUKS device"]) is not None
    assert watch.update(False, ["no LUKS device"]) is None
