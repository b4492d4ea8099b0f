"""The resume in the graph's order (cryptlockd/helper/resume.py), with the fake Ops: stacked
devices, keyfile chains, headers read just in time, skipping, devices gone while asleep."""

from __future__ import annotations

from cryptlockd.helper import wake_watch
from cryptlockd.helper.cycle import DevicePlan, run_cycle, wind_down
from cryptlockd.helper.prompt_screen import SKIP_KEY, SLEEP_KEY, PromptInfo
from cryptlockd.helper.record import CycleRecord
from cryptlockd.helper.resume import REDRAW
from cryptlockd.helper.secret import SecretBuffer
from tests.unit.test_helper_cycle import GOOD, FakeOps

SKIP = bytes([SKIP_KEY])


def run(ops: FakeOps, plan: list[DevicePlan]) -> CycleRecord:
    rec = CycleRecord([d.name for d in plan])
    run_cycle(ops, plan, rec)
    rec.finish()
    return rec


def after_sleep(ops: FakeOps) -> list[str]:
    return ops.calls[ops.calls.index("release_reserve") + 1 :]


def test_luks_on_lvm_on_luks_one_prompt_and_the_upper_header_read_after_the_lower_resume() -> None:
    # Suspend order, as the daemon sends it: upper first. Reading upper's header through a
    # suspended lower would hang in D state: it is read only once lower is back.
    plan = [DevicePlan("upper", "passphrase", after=["lower"]), DevicePlan("lower", "passphrase")]
    ops = FakeOps([GOOD])
    rec = run(ops, plan)
    assert [c for c in ops.calls if c.startswith("suspend:")] == ["suspend:upper", "suspend:lower"]
    assert after_sleep(ops)[:5] == [
        "refresh:lower",
        "prompt:lower",
        "resume:lower",
        "refresh:upper",
        "resume:upper",
    ]
    assert rec.success and rec.resumed == ["lower", "upper"]


def test_a_passphrase_device_on_a_keyfile_device() -> None:
    plan = [
        DevicePlan("upper", "passphrase", after=["lower"]),
        DevicePlan("lower", "keyfile:/boot/lower.key"),
    ]
    ops = FakeOps([GOOD])
    rec = run(ops, plan)
    assert after_sleep(ops)[:5] == [
        "refresh:lower",
        "keyfile:lower:/boot/lower.key",
        "refresh:upper",
        "prompt:upper",
        "resume:upper",
    ]
    assert rec.success


def test_a_keyfile_chain_comes_back_link_by_link() -> None:
    plan = [
        DevicePlan("archive", "keyfile:/srv/archive.key", after=["data", "root"]),
        DevicePlan("data", "keyfile:/etc/data.key", after=["root"]),
        DevicePlan("root", "passphrase"),
    ]
    ops = FakeOps([GOOD])
    rec = run(ops, plan)
    assert [c for c in after_sleep(ops) if not c.startswith("refresh")][:4] == [
        "prompt:root",
        "resume:root",
        "keyfile:data:/etc/data.key",
        "keyfile:archive:/srv/archive.key",
    ]
    assert rec.success


def test_a_wrong_passphrase_on_the_lower_device_asks_again_for_the_lower_one() -> None:
    plan = [DevicePlan("upper", "passphrase", after=["lower"]), DevicePlan("lower", "passphrase")]
    ops = FakeOps([b"nope", GOOD])
    rec = run(ops, plan)
    assert [c for c in after_sleep(ops) if c.startswith(("prompt", "backoff"))] == [
        "prompt:lower",
        "backoff:1",
        "prompt:lower",
    ]
    assert rec.wrong_passphrases == 1 and rec.success
    assert after_sleep(ops).count("refresh:lower") == 1


# -- essential and skippable -------------------------------------------------------------

USB_PLAN = [
    DevicePlan("usb", "passphrase", essential=False),
    DevicePlan("data", "keyfile:/etc/data.key", after=["root"], essential=False),
    DevicePlan("root", "passphrase"),
]


def usb_wants_another_passphrase(ops: FakeOps) -> None:
    real = ops.resume_passphrase

    def resume(device: str, secret: SecretBuffer) -> bool:
        return device != "usb" and real(device, secret)

    ops.resume_passphrase = resume  # type: ignore[method-assign]


def test_once_the_essential_devices_are_back_the_rest_can_be_skipped() -> None:
    ops = FakeOps([GOOD, SKIP])
    usb_wants_another_passphrase(ops)
    rec = run(ops, USB_PLAN)
    prompts = [c for c in ops.calls if c.startswith("prompt")]
    # The first prompt serves root and tries usb too; no skip while root is suspended.
    assert prompts == ["prompt:root,usb", "prompt:usb (skip?)"]
    assert "close:usb" in ops.calls
    assert ops.calls.index("close:usb") < ops.calls.index("thaw:/user.slice,/system.slice")
    d = rec.as_dict()
    assert d["skipped"] == ["usb"] and d["resumed"] == ["root", "data"]
    assert "usb skipped at the prompt" in d["problems"]
    assert rec.wrong_passphrases == 0 and rec.success


def test_the_skip_key_does_nothing_while_an_essential_device_waits() -> None:
    # Ctrl+S at root's prompt: root cannot be skipped, and the key is never a passphrase
    # (not tried, not a failure): the prompt comes again.
    ops = FakeOps([b"typed then " + SKIP, GOOD, SKIP])
    usb_wants_another_passphrase(ops)
    rec = run(ops, USB_PLAN)
    prompts = [c for c in ops.calls if c.startswith("prompt")]
    assert prompts == ["prompt:root,usb", "prompt:root,usb", "prompt:usb (skip?)"]
    assert rec.wrong_passphrases == 0 and rec.skipped == ["usb"] and "resume:root" in ops.calls


def test_a_device_skipped_takes_what_needs_it_along_upper_layers_closed_first() -> None:
    plan = [
        DevicePlan("usb-home", "passphrase", after=["usb"], essential=False),
        DevicePlan("usb", "passphrase", essential=False),
        DevicePlan("root", "passphrase"),
    ]
    ops = FakeOps([GOOD, SKIP])
    usb_wants_another_passphrase(ops)
    rec = run(ops, plan)
    assert rec.skipped == ["usb", "usb-home"]
    closes = [c for c in ops.calls if c.startswith("close")]
    assert closes == ["close:usb-home", "close:usb"]
    assert "usb-home skipped: it needs usb" in rec.problems


def test_a_device_gone_while_asleep_is_not_prompted_for() -> None:
    ops = FakeOps([GOOD])
    ops.gone = {"usb"}
    rec = run(ops, USB_PLAN)
    assert [c for c in ops.calls if c.startswith("prompt")] == ["prompt:root"]
    assert "close:usb" in ops.calls and rec.skipped == ["usb"]
    assert "usb disappeared while the machine slept: not prompted for" in rec.problems


def test_an_essential_device_that_seems_gone_is_still_prompted_for() -> None:
    ops = FakeOps([GOOD])
    ops.gone = {"root"}
    rec = run(ops, [DevicePlan("root", "passphrase")])
    assert "prompt:root" in ops.calls and rec.skipped == [] and rec.success


def test_a_close_that_fails_is_recorded_and_the_machine_still_thaws() -> None:
    ops = FakeOps([GOOD])
    ops.gone = {"usb"}

    def deactivate(device: str) -> None:
        raise OSError("EBUSY")

    ops.deactivate = deactivate  # type: ignore[method-assign]
    rec = run(ops, USB_PLAN)
    assert "closing usb: EBUSY; it stays suspended" in rec.problems
    assert ops.calls[-1].startswith("thaw")


def test_the_recovery_resumes_in_graph_order_too() -> None:
    plan = [DevicePlan("upper", "passphrase", after=["lower"]), DevicePlan("lower", "passphrase")]
    ops = FakeOps([GOOD])
    rec = CycleRecord(["upper", "lower"])
    wind_down(ops, plan, ["upper", "lower"], ["/user.slice"], None, rec)
    assert ops.calls[:5] == [
        "release_reserve",
        "refresh:lower",
        "prompt:lower",
        "resume:lower",
        "refresh:upper",
    ]


def test_plan_entries_carry_after_and_header() -> None:
    p = DevicePlan.from_dict(
        {"name": "d", "key_source": "passphrase", "after": ["r"], "header": "/etc/h"}
    )
    assert p.after == ["r"] and p.header == "/etc/h"
    assert DevicePlan.from_dict(p.as_dict()).as_dict() == p.as_dict()


def test_a_device_that_vanishes_during_the_prompt_ends_it_and_is_not_asked_again() -> None:
    # The kernel handles the unplug only after the wake: the prompt (SystemOps) gives up
    # when a device it may drop goes, and the next round is drawn without it.
    ops = FakeOps([GOOD])
    real = ops.prompt

    def prompt(secret: SecretBuffer, info: PromptInfo) -> str:
        if "usb" in info.asking:
            ops.calls.append(f"prompt:{','.join(info.asking)} gave up")
            assert info.vanishing == ["usb"]
            ops.gone.add("usb")
            return REDRAW
        return real(secret, info)

    ops.prompt = prompt  # type: ignore[method-assign]
    rec = run(ops, USB_PLAN)
    assert [c for c in ops.calls if c.startswith("prompt")] == [
        "prompt:root,usb gave up",
        "prompt:root",
    ]
    assert rec.skipped == ["usb"] and rec.wrong_passphrases == 0 and rec.success


# -- issue 14: back to sleep from the prompt, the give-up ---------------------------------

ESC = bytes([SLEEP_KEY])


def test_esc_the_lid_and_an_unanswered_wake_sleep_again_with_the_devices_suspended() -> None:
    ops = FakeOps([ESC, wake_watch.LID, wake_watch.UNANSWERED, b"wrong", GOOD])
    rec = run(ops, USB_PLAN[1:])
    after = after_sleep(ops)
    # root's header is read once, before the first prompt.
    assert after[0] == "refresh:root" and after.count("refresh:root") == 1
    # Each sleeps again from the prompt, nothing resumed in between; the next wake prompts.
    assert after[1:8] == [
        "prompt:root",
        "sleep",
        "prompt:root",
        "sleep",
        "prompt:root",
        "sleep",
        "prompt:root",
    ]
    assert rec.slept_again == ["esc", "lid", "unanswered"] and rec.success
    # Esc is not a wrong passphrase; the failure count reaches the screen.
    assert rec.wrong_passphrases == 1 and [i.failures for i in ops.infos] == [0, 0, 0, 0, 1]
    assert all(i.sleep_again for i in ops.infos) and ops.infos[0].waiting == ["data"]
    assert "sleep_again:lid" in rec.timeline and "woke#4" in rec.timeline
    assert all(s.is_zero() for s in ops.secrets)


def test_without_a_sleep_to_go_back_to_the_prompt_just_comes_again() -> None:
    # A lock without sleep (resume_all's sleep_again=False): Esc does nothing.
    ops = FakeOps([ESC, GOOD])
    rec = CycleRecord(["root"])
    wind_down(ops, [DevicePlan("root", "passphrase")], ["root"], [], None, rec, sleep_again=False)
    assert ops.calls.count("sleep") == 0 and rec.slept_again == [] and rec.wrong_passphrases == 0
    assert [i.sleep_again for i in ops.infos] == [False, False]


def test_a_refused_sleep_again_leaves_the_prompt_waiting() -> None:
    ops = FakeOps([ESC, GOOD])
    ops.sleep_fails = True
    rec = CycleRecord(["root"])
    wind_down(ops, [DevicePlan("root", "passphrase")], ["root"], [], None, rec)
    assert any(p.startswith("sleeping again (esc): writing 'mem'") for p in rec.problems)
    assert "resume:root" in ops.calls


def test_nobody_unlocking_in_time_powers_off() -> None:
    ops = FakeOps([wake_watch.GIVE_UP, GOOD])
    rec = run(ops, USB_PLAN[1:])
    assert after_sleep(ops)[:3] == ["refresh:root", "prompt:root", "power_off"]
    assert ops.power_off_why.startswith("Nobody unlocked the disks in time")
    # Should the power-off not happen, the prompt goes on.
    assert rec.success
