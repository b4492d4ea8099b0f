"""The prompt screen and the prompt's keys (cryptlockd/helper/prompt_screen.py), the
wake's watch (wake_watch.py) and the input devices' sysfs bitmaps (inputs.py): pure."""

from __future__ import annotations

from pathlib import Path

from cryptlockd.helper import inputs
from cryptlockd.helper.prompt_screen import (
    CLEAR,
    PASSPHRASE,
    SKIP,
    SKIP_KEY,
    SLEEP,
    SLEEP_KEY,
    PromptInfo,
    line_kind,
    render,
)
from cryptlockd.helper.secret import SecretBuffer
from cryptlockd.helper.wake_watch import GIVE_UP, LID, UNANSWERED, WakeWatch

MOUNTS = {"root": ["/", "/home"], "data": ["/data"], "usb": []}


def test_the_screen_is_cleared_and_names_the_machine_the_disks_and_the_keys() -> None:
    screen = render(PromptInfo(["root"], waiting=["data"]), "laptop", MOUNTS)
    assert screen.startswith(CLEAR + "laptop is locked")
    lines = screen.splitlines()
    assert any(ln.split() == ["/,", "/home", "root", "needs", "the", "passphrase"] for ln in lines)
    assert any(ln.split()[:2] == ["/data", "data"] for ln in lines), screen
    assert "Enter    unlock" in screen and "Esc      put the machine back to sleep" in screen
    assert "failed" not in screen and "Ctrl+S" not in screen
    # The prompt line comes last, the cursor after it.
    assert screen.endswith("\nPassphrase for root: ")


def test_the_screen_counts_failures_and_offers_the_skip_only_when_it_may() -> None:
    one = render(PromptInfo(["usb"], failures=1, skippable=True), "h", MOUNTS)
    assert "1 failed attempt." in one and "Ctrl+S   skip usb" in one
    assert "(not mounted)" in one
    three = render(PromptInfo(["root"], failures=3), "h", MOUNTS)
    assert "3 failed attempts." in three and "Ctrl+S" not in three


def test_without_a_sleep_to_go_back_to_esc_is_not_offered() -> None:
    screen = render(PromptInfo(["root"], sleep_again=False), "", MOUNTS)
    assert "Esc" not in screen and screen.startswith(CLEAR + "This machine is locked")


def typed(data: bytes) -> SecretBuffer:
    s = SecretBuffer()
    s.view()[: len(data)] = data
    s.length = len(data)
    return s


def test_a_line_ending_in_a_prompt_key_is_that_key_never_a_passphrase() -> None:
    assert line_kind(typed(b"Lid-Shut")) == PASSPHRASE
    assert line_kind(typed(b"")) == PASSPHRASE
    assert line_kind(typed(bytes([SLEEP_KEY]))) == SLEEP
    assert line_kind(typed(b"half typed" + bytes([SLEEP_KEY]))) == SLEEP
    assert line_kind(typed(bytes([SKIP_KEY]))) == SKIP
    assert line_kind(typed(bytes([SKIP_KEY]) + b"x")) == PASSPHRASE


# -- the wake's watch ----------------------------------------------------------------------


def test_give_up_counts_from_the_wake_whatever_is_typed() -> None:
    w = WakeWatch(100.0, give_up_after=60, unanswered_after=10)
    assert w.check(159.0, False, True) == ""
    assert w.check(160.0, False, True) == GIVE_UP
    assert WakeWatch(100.0).check(10_000.0, None, False) == ""  # off by default


def test_the_lid_closed_again_at_the_prompt_sleeps() -> None:
    w = WakeWatch(0.0)
    assert w.check(1.0, False, False) == ""
    assert w.check(2.0, True, True) == LID


def test_a_wake_with_the_lid_shut_and_no_key_sleeps_after_the_delay() -> None:
    w = WakeWatch(0.0, unanswered_after=10)
    assert w.check(9.0, True, False) == ""
    assert w.check(10.0, True, False) == UNANSWERED
    # A key on an external keyboard (docked, lid shut) is an answer.
    docked = WakeWatch(0.0, unanswered_after=10)
    assert docked.check(3.0, True, True) == ""
    assert docked.check(30.0, True, False) == ""
    # Without a lid switch nothing says the machine is in a bag.
    assert WakeWatch(0.0, unanswered_after=10).check(30.0, None, False) == ""
    assert WakeWatch(0.0, unanswered_after=0).check(30.0, True, False) == ""


def test_without_a_sleep_to_go_back_to_only_the_give_up_is_left() -> None:
    w = WakeWatch(0.0, give_up_after=100, unanswered_after=10, sleep_again=False)
    assert w.check(1.0, False, False) == ""
    assert w.check(50.0, True, False) == ""
    assert w.check(100.0, True, False) == GIVE_UP


# -- the input devices -------------------------------------------------------------------


def test_capability_bitmaps_as_sysfs_writes_them() -> None:
    assert inputs.bitmap_has("1", inputs.SW_LID)
    assert not inputs.bitmap_has("2", inputs.SW_LID) and not inputs.bitmap_has("", 0)
    # A keyboard: several longs, most significant first, no leading zeros.
    keys = "3 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 0 50000000"
    assert inputs.bitmap_has("1 0", 64) and not inputs.bitmap_has("1 0", 0)
    assert inputs.bitmap_has(keys, 28) and inputs.bitmap_has(keys, 30)
    assert not inputs.bitmap_has(keys, 29) and inputs.bitmap_has(keys, 17 * 64 + 1)


def test_lids_and_keyboards_are_found_in_sysfs(tmp_path: Path) -> None:
    def device(name: str, sw: str, key: str) -> None:
        caps = tmp_path / name / "device" / "capabilities"
        caps.mkdir(parents=True)
        (caps / "sw").write_text(sw + "\n")
        (caps / "key").write_text(key + "\n")

    device("event0", "1", "0")  # the lid
    device("event1", "0", "50000000")  # a keyboard (Enter, A)
    device("event2", "0", "10000000000000 0")  # the power button
    (tmp_path / "mouse0").mkdir()
    assert inputs.find_devices(str(tmp_path)) == (["/dev/input/event0"], ["/dev/input/event1"])
    assert inputs.find_devices(str(tmp_path / "absent")) == ([], [])
