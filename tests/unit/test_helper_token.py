"""TPM2+PIN tokens at the resume prompt (cryptlockd/helper/token.py): which tokens are ever
tried, the order of one line (PIN, then passphrase), a wrong PIN as a failed try, one TPM
strike per round at most; and the token JSON read from a real LUKS2 header."""

from __future__ import annotations

import ctypes
import errno
import json
import os
from pathlib import Path

import pytest

from cryptlockd.helper import token
from cryptlockd.helper.cycle import DevicePlan, run_cycle
from cryptlockd.helper.libcryptsetup import Device
from cryptlockd.helper.record import CycleRecord
from tests.unit.test_helper_cycle import GOOD, FakeOps
from tests.unit.test_helper_libcryptsetup import header_device, luks2_image

PIN = b"2468"


def tpm2_token(pin: bool | None) -> str:
    t: dict[str, object] = {
        "type": "systemd-tpm2",
        "keyslots": ["3"],
        "tpm2-blob": "AAAA",
        "tpm2-pcrs": [7],
        "tpm2-pcr-bank": "sha256",
        "tpm2-primary-alg": "ecc",
        "tpm2-policy-hash": "00" * 32,
    }
    if pin is not None:
        t["tpm2-pin"] = pin
    return json.dumps(t)


def test_only_a_tpm2_token_with_a_pin_is_offered() -> None:
    assert token.classify(tpm2_token(True)) == token.PIN_TOKEN
    # Without a PIN the TPM unseals for whoever opens the lid: never used at resume.
    assert token.classify(tpm2_token(False)) == token.NO_PIN_TOKEN
    assert token.classify(tpm2_token(None)) == token.NO_PIN_TOKEN
    assert token.classify(json.dumps({"type": "systemd-fido2"})) == token.FIDO2_TOKEN
    assert token.classify(json.dumps({"type": "systemd-pkcs11"})) == token.OTHER_TOKEN
    assert token.classify("{not json") == token.OTHER_TOKEN
    assert token.classify("[]") == token.OTHER_TOKEN
    tokens = {0: tpm2_token(False), 2: tpm2_token(True), 5: json.dumps({"type": "x"})}
    assert token.pin_token_ids(tokens) == [2]
    assert token.pin_token_ids({0: tpm2_token(False)}) == []


PLAN = [
    DevicePlan("root", "passphrase"),
    DevicePlan("data", "keyfile:/etc/keys/data.key", after=["root"]),
]


def cycle(ops: FakeOps, plan: list[DevicePlan] = PLAN, poweroff_after: int = 0) -> CycleRecord:
    rec = CycleRecord([d.name for d in plan])
    run_cycle(ops, plan, rec, poweroff_after)
    rec.finish()
    return rec


def after_sleep(ops: FakeOps) -> list[str]:
    return ops.calls[ops.calls.index("release_reserve") + 1 :]


def test_the_pin_resumes_without_a_passphrase_try() -> None:
    ops = FakeOps([PIN])
    ops.pins = {"root": PIN}
    rec = cycle(ops)
    assert after_sleep(ops)[:4] == [
        "refresh:root",
        "prompt:root",
        "pin:root",
        "refresh:data",
    ]
    assert "resume:root" not in ops.calls  # no KDF run for the PIN
    assert rec.success and rec.wrong_passphrases == 0
    assert "token:root" in rec.timeline


def test_a_wrong_pin_is_a_failed_try_then_the_pin_resumes() -> None:
    ops = FakeOps([b"1357", PIN])
    ops.pins = {"root": PIN}
    rec = cycle(ops)
    assert [c for c in after_sleep(ops) if c.split(":")[0] in ("prompt", "pin", "backoff")] == [
        "prompt:root",
        "pin:root",
        "backoff:1",
        "prompt:root",
        "pin:root",
    ]
    assert rec.success and rec.wrong_passphrases == 1


def test_the_passphrase_still_works_after_the_token_refused_it() -> None:
    ops = FakeOps([GOOD])
    ops.pins = {"root": PIN}
    rec = cycle(ops)
    assert after_sleep(ops)[:4] == ["refresh:root", "prompt:root", "pin:root", "resume:root"]
    assert rec.success and rec.wrong_passphrases == 0


def test_one_refusal_per_round_at_most_each_is_a_tpm_strike() -> None:
    plan = [DevicePlan("home", "passphrase"), DevicePlan("root", "passphrase")]
    ops = FakeOps([GOOD])
    ops.pins = {"root": PIN, "home": PIN}
    rec = cycle(ops, plan)
    assert [c for c in ops.calls if c.startswith("pin:")] == ["pin:root"]
    assert rec.success and sorted(rec.resumed) == ["home", "root"]


def test_one_pin_for_two_devices() -> None:
    plan = [DevicePlan("home", "passphrase"), DevicePlan("root", "passphrase")]
    ops = FakeOps([PIN])
    ops.pins = {"root": PIN, "home": PIN}
    rec = cycle(ops, plan)
    assert sorted(c for c in ops.calls if c.startswith("pin:")) == ["pin:home", "pin:root"]
    assert rec.success and rec.wrong_passphrases == 0


def test_a_broken_token_is_reported_once_and_the_passphrase_opens() -> None:
    ops = FakeOps([b"nope", GOOD])
    ops.pins = {"root": PIN}
    ops.token_broken = "token 1: No such device (TPM2 device not found)"
    rec = cycle(ops)
    assert rec.success and rec.wrong_passphrases == 1
    problems = [p for p in rec.problems if "TPM2 PIN" in p]
    assert problems == ["TPM2 PIN for root: token 1: No such device (TPM2 device not found)"]


def test_the_pin_buffer_is_wiped_after_each_try() -> None:
    ops = FakeOps([b"1357", PIN])
    ops.pins = {"root": PIN}
    cycle(ops)
    assert ops.secrets and all(s.is_zero() for s in ops.secrets)


@pytest.mark.skipif(os.geteuid() != 0, reason="libcryptsetup locks under /run/cryptsetup")
def test_tokens_are_read_from_a_real_luks2_header(tmp_path: Path) -> None:
    with luks2_image(tmp_path, "crypt_resume_by_token_pin") as (library, cd):
        lib = library.lib
        lib.crypt_token_json_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
        for token_id, pin in ((1, False), (4, True)):
            rc = lib.crypt_token_json_set(cd, token_id, tpm2_token(pin).encode())
            assert rc == token_id, library.messages
        device = header_device(library, cd)
        tokens = token.read_tokens(device)
        assert sorted(tokens) == [1, 4]
        assert token.pin_token_ids(tokens) == [4]
        assert token.has_pin_token(device)
        assert token.prompt_word({"unit": device}, ["unit"]) == "TPM2 PIN or passphrase"
        assert token.prompt_word({"unit": device}, ["other"]) == "Passphrase"


def test_resume_by_pin_tries_each_pin_token_by_id_never_any_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[tuple[bytes, int, int, int]] = []
    answers: list[int] = []

    class FakeLib:
        def crypt_resume_by_token_pin(
            self, cd: object, name: bytes, kind: bytes, token_id: int, addr: int, n: int, u: None
        ) -> int:
            calls.append((kind, token_id, addr, n))
            return answers.pop(0)

    class FakeLibrary:
        lib = FakeLib()
        messages = ("TPM2 device not found.",)

    dev = Device.__new__(Device)
    dev.library, dev.name, dev.cd = FakeLibrary(), "root", None  # type: ignore[assignment]
    tokens = {0: tpm2_token(False), 1: tpm2_token(True), 3: tpm2_token(True)}
    monkeypatch.setattr(token, "read_tokens", lambda device: tokens)

    answers[:] = [-errno.ENOTRECOVERABLE, 5]  # bookworm's refused PIN, then a keyslot
    assert token.resume_by_pin(dev, 4096, 4) is True
    # Token 0 has no PIN: never passed; never CRYPT_ANY_TOKEN (-1) either.
    assert calls == [(b"systemd-tpm2", 1, 4096, 4), (b"systemd-tpm2", 3, 4096, 4)]

    answers[:] = [-errno.ENOANO, -errno.EPERM]
    assert token.resume_by_pin(dev, 4096, 4) is False

    answers[:] = [-errno.ENODEV, -errno.ENOANO]
    with pytest.raises(token.TokenFailed, match=r"token 1: No such device \(TPM2 device not"):
        token.resume_by_pin(dev, 4096, 4)

    monkeypatch.setattr(token, "read_tokens", lambda device: {0: tpm2_token(False)})
    calls.clear()
    assert token.resume_by_pin(dev, 4096, 4) is None and calls == []
