"""How the passphrase's KDF runs are spent (cryptlockd/helper/kdf.py): the keyslot that
worked last first, devices that may share the passphrase at once within the memory budget,
and the resume loop using it (devices asked together derive in parallel)."""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

import pytest

import cryptlockd
from cryptlockd.helper import kdf
from cryptlockd.helper.cycle import DevicePlan, run_cycle
from cryptlockd.helper.kdf import (
    PRIORITY_IGNORE,
    PRIORITY_PREFER,
    ChildAttempt,
    ChildError,
    ChildFailed,
    KdfBudget,
    attempt_all,
    kdf_memory_at_once,
    kernel_skcipher_name,
    kernel_skcipher_usable,
    keyslot_order,
    reraise,
)
from cryptlockd.helper.record import CycleRecord
from cryptlockd.helper.secret import SecretBuffer
from tests.unit.test_helper_cycle import GOOD, FakeOps
from tests.wait import wait_until

BOUND = 10.0  # seconds; only reached when the attempts do not overlap (the failure)
ROOT = Path(cryptlockd.__file__).resolve().parent.parent  # the directory holding cryptlockd/


def test_the_keyslot_that_worked_last_goes_first() -> None:
    assert keyslot_order([0, 1, 2], 2) == [2, 0, 1]
    assert keyslot_order([0, 1, 2], -1) == [0, 1, 2]
    # A remembered keyslot that is gone (removed since): the active ones, in order.
    assert keyslot_order([0, 2], 1) == [0, 2]
    assert keyslot_order([], 3) == []


def test_keyslot_priorities_order_the_others_as_libcryptsetup_does() -> None:
    ignore, prefer = PRIORITY_IGNORE, PRIORITY_PREFER
    # prefer before normal, ignore never; the remembered one still first.
    assert keyslot_order([0, 1, 2, 3], -1, {0: ignore, 3: prefer}) == [3, 1, 2]
    assert keyslot_order([0, 1, 2, 3], 2, {0: ignore, 3: prefer}) == [2, 3, 1]
    # A remembered keyslot set to ignore since is not tried.
    assert keyslot_order([0, 1, 2], 0, {0: ignore}) == [1, 2]
    # All ignored: all of them, rather than a prompt that can never succeed.
    assert keyslot_order([1, 2], -1, {1: ignore, 2: ignore}) == [1, 2]


def test_the_reserve_covers_every_device_that_asks_at_once() -> None:
    memory = {"root": 65536, "data": 65536, "swap": 1048}
    assert kdf_memory_at_once(memory, ["root", "data"]) == 131072
    # A keyfile device's KDF runs alone: the largest one alone may exceed the asking ones.
    assert kdf_memory_at_once({"root": 1000, "big": 9000}, ["root"]) == 9000
    assert kdf_memory_at_once({}, []) == 0


def test_the_budget_runs_what_fits_together_and_a_big_one_alone() -> None:
    budget = KdfBudget(100)
    budget.acquire(60)
    budget.acquire(40)  # fits: 100
    entered = threading.Event()

    def third() -> None:
        budget.acquire(10)
        entered.set()
        budget.release(10)

    t = threading.Thread(target=third, daemon=True)
    t.start()
    assert not entered.wait(0.2)  # over the budget: it waits
    budget.release(60)
    assert entered.wait(BOUND)
    t.join(BOUND)
    budget.release(40)
    # Larger than the whole budget: it runs, alone.
    budget.acquire(500)
    budget.release(500)


def test_attempts_run_at_once_and_come_back_in_order() -> None:
    # Each attempt waits for all the others: only a parallel run gets through the barrier.
    names = ["root", "data", "home"]
    barrier = threading.Barrier(len(names), timeout=BOUND)

    def attempt(name: str) -> bool:
        barrier.wait()
        if name == "home":
            raise OSError("EIO")
        return name == "root"

    outcomes = attempt_all(names, attempt)
    assert [o.ok for o in outcomes] == [True, False, False]
    assert isinstance(outcomes[2].error, OSError) and outcomes[0].error is None
    assert all(o.at > 0 for o in outcomes)
    reraise(outcomes)  # an Exception is the caller's to report, not to raise


def test_an_interrupt_in_a_thread_is_raised_in_the_caller() -> None:
    def attempt(name: str) -> bool:
        if name == "data":
            raise KeyboardInterrupt
        return True

    outcomes = attempt_all(["root", "data"], attempt)
    assert outcomes[0].ok
    with pytest.raises(KeyboardInterrupt):
        reraise(outcomes)


class ParallelOps(FakeOps):
    """resume_passphrase waits until every device sharing the passphrase is inside it."""

    def __init__(self, typed: list[bytes], together: int) -> None:
        super().__init__(typed)
        self.barrier = threading.Barrier(together, timeout=BOUND)
        self.inside: list[str] = []

    def resume_passphrase(self, device: str, secret: SecretBuffer) -> bool:
        self.inside.append(device)
        self.barrier.wait()
        return super().resume_passphrase(device, secret)


def test_devices_that_share_the_passphrase_resume_at_once() -> None:
    # root and home are independent passphrase devices; data's keyfile is on root.
    plan = [
        DevicePlan("data", "keyfile:/etc/keys/data.key", after=["root"]),
        DevicePlan("home", "passphrase"),
        DevicePlan("root", "passphrase"),
    ]
    ops = ParallelOps([GOOD], together=2)
    rec = CycleRecord([d.name for d in plan])
    run_cycle(ops, plan, rec)
    rec.finish()
    assert sorted(ops.inside) == ["home", "root"]
    assert sorted(rec.resumed[:2]) == ["home", "root"] and rec.resumed[2] == "data"
    assert rec.success, rec.reason
    # One prompt; the keyfile device right after the one holding its keyfile.
    assert sum(c.startswith("prompt") for c in ops.calls) == 1
    calls = [c for c in ops.calls if c.startswith(("resume", "keyfile"))]
    assert calls[-1] == "keyfile:data:/etc/keys/data.key"
    timeline = rec.timeline
    assert timeline["resumed:data"] >= max(timeline["resumed:root"], timeline["resumed:home"])
    # Memory locked as touched before the KDFs that run at once, once (Resumer.lock_on_fault).
    assert ops.calls.count("lock_on_fault") == 1
    assert ops.calls.index("lock_on_fault") < ops.calls.index("resume:root")


def test_one_kdf_at_a_time_keeps_memory_faulted_in_when_mapped() -> None:
    # One passphrase device, then its keyfile device: no KDFs at once, no switch.
    plan = [
        DevicePlan("data", "keyfile:/etc/keys/data.key", after=["root"]),
        DevicePlan("root", "passphrase"),
    ]
    ops = FakeOps([GOOD])
    rec = CycleRecord([d.name for d in plan])
    run_cycle(ops, plan, rec)
    rec.finish()
    assert rec.success and "lock_on_fault" not in ops.calls


def test_a_failed_switch_to_lock_on_fault_costs_time_not_the_resume() -> None:
    plan = [DevicePlan("home", "passphrase"), DevicePlan("root", "passphrase")]
    ops = FakeOps([GOOD], lock_on_fault_fails=True)
    rec = CycleRecord([d.name for d in plan])
    run_cycle(ops, plan, rec)
    rec.finish()
    assert rec.success, rec.reason
    assert sorted(rec.resumed) == ["home", "root"]
    assert sum(c.startswith("prompt") for c in ops.calls) == 1
    assert rec.problems == ["locking memory on fault: mlockall(MCL_ONFAULT): Invalid argument"]


def test_the_kernel_name_of_a_keyslot_cipher() -> None:
    assert kernel_skcipher_name("aes-xts-plain64") == "xts(aes)"
    assert kernel_skcipher_name("aes-cbc-essiv:sha256") == "cbc(aes)"
    assert kernel_skcipher_name("serpent-xts-plain") == "xts(serpent)"
    assert kernel_skcipher_name("capi:xts(aes)-plain64") is None
    assert kernel_skcipher_name("") is None
    assert kernel_skcipher_name("aes") is None


def test_a_cipher_the_kernel_does_not_have_is_not_usable() -> None:
    assert not kernel_skcipher_usable("nosuchmode(nosuchcipher)")


@pytest.fixture
def no_child_lock(monkeypatch: pytest.MonkeyPatch) -> None:
    """The children's mlockall is the guest's to show (tests/vm): a test runner that is
    not root may lock only a few MiB. Patched before the fork, so the children see it."""
    monkeypatch.setattr(kdf, "lock_on_fault", lambda: None)


def _child(answer: dict[str, object], seen: list[dict[str, object]]) -> ChildAttempt:
    def apply(got: dict[str, Any]) -> bool:
        seen.append(got)
        if "error" in got:
            raise ChildError(str(got["error"]))
        return bool(got["ok"])

    return ChildAttempt(lambda: answer, apply)


@pytest.mark.usefixtures("no_child_lock")
def test_children_answer_for_their_devices_and_the_first_runs_here() -> None:
    seen: list[dict[str, object]] = []
    here: list[str] = []

    def attempt(name: str) -> bool:
        here.append(name)
        return True

    children = {
        "data": _child({"ok": True, "pid": "child"}, seen),
        "home": _child({"ok": False}, seen),
        "swap": _child({"error": "crypt_resume_by_volume_key(swap): EIO"}, seen),
    }
    outcomes = attempt_all(["root", "data", "home", "swap"], attempt, children)
    assert here == ["root"]  # no thread, no second try for a child that answered
    assert [o.ok for o in outcomes] == [True, True, False, False]
    assert isinstance(outcomes[3].error, ChildError) and "EIO" in str(outcomes[3].error)
    # Dated by the child: when it was done, not when it was collected.
    assert all(isinstance(a["at"], float) for a in seen)
    assert outcomes[1].at == seen[0]["at"]


@pytest.mark.usefixtures("no_child_lock")
def test_a_child_that_dies_without_an_answer_has_its_attempt_here() -> None:
    def die() -> dict[str, Any]:
        os.kill(os.getpid(), signal.SIGKILL)
        raise AssertionError("not reached")

    child = ChildAttempt(die, lambda answer: True)
    with pytest.raises(ChildFailed, match="without an answer \\(killed by SIGKILL\\)"):
        ChildAttempt(die, lambda answer: True).finish()
    here: list[str] = []
    outcomes = attempt_all(["root", "data"], lambda n: here.append(n) is None, {"data": child})
    assert here == ["root", "data"] and [o.ok for o in outcomes] == [True, True]


@pytest.mark.usefixtures("no_child_lock")
def test_children_derive_at_once_with_the_caller() -> None:
    # Each side waits for the other's mark: only attempts that overlap get through.
    r, w = os.pipe()

    def in_child() -> dict[str, Any]:
        os.write(w, b"x")
        return {"ok": True}

    child = ChildAttempt(in_child, lambda answer: bool(answer["ok"]))
    os.close(w)

    def here(name: str) -> bool:
        ready, _, _ = select.select([r], [], [], BOUND)
        return bool(ready) and os.read(r, 1) == b"x"

    try:
        outcomes = attempt_all(["root", "data"], here, {"data": child})
    finally:
        os.close(r)
    assert [o.ok for o in outcomes] == [True, True]


def test_a_child_dies_with_the_helper(tmp_path: Path) -> None:
    # The helper SIGKILLed mid-KDF: its child must not derive (and resume) on alone.
    pid_file = tmp_path / "child.pid"
    script = tmp_path / "parent.py"
    script.write_text(
        "import os, sys, time\n"
        "from cryptlockd.helper import kdf\n"
        "kdf.lock_on_fault = lambda: None\n"
        "def run():\n"
        f"    open({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
        "    time.sleep(60)\n"
        "    return {}\n"
        "kdf.ChildAttempt(run, lambda a: True)\n"
        "deadline = time.monotonic() + 10\n"
        f"while not (os.path.exists({str(pid_file)!r}) and os.path.getsize({str(pid_file)!r})):\n"
        "    assert time.monotonic() < deadline\n"
        "    time.sleep(0.01)\n"
        "os.kill(os.getpid(), 9)\n"
    )
    subprocess.run([sys.executable, str(script)], timeout=BOUND, cwd=ROOT, check=False)
    child = int(pid_file.read_text())

    def gone() -> bool:
        try:
            return Path(f"/proc/{child}/stat").read_text().split(") ")[1][0] == "Z"
        except FileNotFoundError:
            return True

    wait_until(gone, BOUND, message="the orphaned child gone")


class ChildOps(FakeOps):
    """Every device asked with others but the first goes to a real child, which checks the
    passphrase it sees in its copy of the helper's memory."""

    def passphrase_children(
        self, names: list[str], secret: SecretBuffer
    ) -> dict[str, ChildAttempt]:
        def child(name: str) -> ChildAttempt:
            def apply(answer: dict[str, Any]) -> bool:
                if answer["ok"]:
                    self.calls.append(f"resume:{name}")
                return bool(answer["ok"])

            return ChildAttempt(lambda: {"ok": bytes(secret.buf[: secret.length]) == GOOD}, apply)

        return {name: child(name) for name in names[1:]}


@pytest.mark.usefixtures("no_child_lock")
def test_devices_that_share_the_passphrase_resume_in_children() -> None:
    plan = [DevicePlan("home", "passphrase"), DevicePlan("root", "passphrase")]
    ops = ChildOps([b"wrong", GOOD])
    rec = CycleRecord([d.name for d in plan])
    run_cycle(ops, plan, rec)
    rec.finish()
    assert rec.success, rec.reason
    assert sorted(rec.resumed) == ["home", "root"] and rec.wrong_passphrases == 1
    assert sorted(c for c in ops.calls if c.startswith("resume:")) == ["resume:home", "resume:root"]
    # One KDF in the helper itself: its memory is still faulted in whole when mapped.
    assert "lock_on_fault" not in ops.calls
