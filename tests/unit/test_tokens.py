"""Check()'s view of the LUKS2 tokens (cryptlockd/daemon/tokens.py): a TPM2 token without a
PIN is named, one with a PIN is offered, FIDO2 is not used; the header is read by hand
from a real LUKS2 header file."""

from __future__ import annotations

import ctypes
import json
import os
from pathlib import Path

import pytest

from cryptlockd.daemon import tokens
from cryptlockd.daemon.devices import LuksDevice
from tests.unit.test_helper_libcryptsetup import IMAGE, luks2_image
from tests.unit.test_helper_token import tpm2_token
from tests.wait import wait_until_async


def test_a_tpm2_token_without_a_pin_is_named_and_not_blocking() -> None:
    results = tokens.check_tokens(
        {
            "root": {0: tpm2_token(False), 1: tpm2_token(True)},
            "home": {2: json.dumps({"type": "systemd-fido2", "keyslots": []})},
            "data": {},
        }
    )
    by_name = {r.name: r for r in results}
    assert set(by_name) == {"tpm2-pin-token", "tpm2-token-without-pin", "fido2-token"}
    no_pin = by_name["tpm2-token-without-pin"]
    assert not no_pin.ok and not no_pin.blocking
    assert "root (token 0)" in no_pin.detail and "never used at resume" in no_pin.detail
    assert by_name["tpm2-pin-token"].ok and "root (token 1)" in by_name["tpm2-pin-token"].detail
    assert "home (token 2)" in by_name["fido2-token"].detail
    assert all(not r.blocking for r in results)


def test_no_line_without_tokens() -> None:
    assert tokens.check_tokens({"root": {}, "data": {}}) == []


def test_parse_tokens() -> None:
    area = json.dumps({"tokens": {"0": {"type": "systemd-tpm2"}}, "keyslots": {}}).encode()
    assert tokens.parse_tokens(area + b"\0" * 100) == {0: json.dumps({"type": "systemd-tpm2"})}
    assert tokens.parse_tokens(b"\0") == {}
    assert tokens.parse_tokens(b"[1]\0") == {}


def test_header_path(tmp_path: Path) -> None:
    dev = LuksDevice("root", "u-1", "LUKS2", "/dev/vda", True, False, "passphrase")
    assert tokens.header_path(dev, str(tmp_path)) == "/dev/vda"
    (tmp_path / "u-1").touch()
    assert tokens.header_path(dev, str(tmp_path)) == str(tmp_path / "u-1")
    detached = LuksDevice("x", "u-1", "LUKS2", "/dev/vdb", False, False, "passphrase", header="/h")
    assert tokens.header_path(detached, str(tmp_path)) == "/h"


@pytest.mark.skipif(os.geteuid() != 0, reason="libcryptsetup locks under /run/cryptsetup")
def test_tokens_are_read_from_a_real_header_and_again_when_it_changes(tmp_path: Path) -> None:
    image = tmp_path / IMAGE
    with luks2_image(tmp_path) as (library, cd):
        lib = library.lib
        lib.crypt_token_json_set.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_char_p]
        assert tokens.read_tokens(str(image)) == {}
        assert lib.crypt_token_json_set(cd, 0, tpm2_token(False).encode()) == 0
        found = tokens.read_tokens(str(image))
        assert list(found) == [0]
        assert json.loads(found[0])["type"] == "systemd-tpm2"
        assert lib.crypt_token_json_set(cd, 3, tpm2_token(True).encode()) == 3
        assert sorted(tokens.read_tokens(str(image))) == [0, 3]
    plain = tmp_path / "plain.img"
    plain.write_bytes(b"\0" * 8192)
    assert tokens.read_tokens(str(plain)) == {}
    assert tokens.read_tokens(str(tmp_path / "absent")) == {}


@pytest.mark.asyncio
async def test_a_header_read_that_hangs_never_blocks_check(tmp_path: Path) -> None:
    # A FIFO with no writer: open() waits, as a read from a disk that died while asleep
    # waits in D state. Check() must answer meanwhile, and pick the tokens up once it ends.
    fifo = tmp_path / "header"
    os.mkfifo(fifo)
    changed: list[bool] = []
    watch = tokens.TokenWatch(lambda: changed.append(True))
    dev = LuksDevice("stick", "", "LUKS2", "/dev/x", False, False, "passphrase", header=str(fifo))
    assert watch.check([dev]) == []  # returned although the read waits
    assert watch.check([dev]) == [] and watch._reading == {"stick"}  # not read twice
    assert not changed
    fd = os.open(fifo, os.O_WRONLY)  # the read goes on: no LUKS header there
    os.close(fd)
    await wait_until_async(lambda: changed, message="the read's end reported")
    assert watch.found == {"stick": {}} and watch._reading == set()
    # While a sleep is in progress nothing is read: what was found stands.
    assert watch.check([dev], read=False) == [] and watch._reading == set()
    # A device gone is forgotten.
    assert watch.check([]) == [] and watch.found == {}


@pytest.mark.asyncio
async def test_a_header_is_read_again_at_most_once_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    header = tmp_path / "header"
    header.write_bytes(b"\0" * 4096)
    reads: list[str] = []
    real = tokens.read_tokens
    monkeypatch.setattr(tokens, "read_tokens", lambda p: reads.append(p) or real(p))
    dev = LuksDevice("d", "", "LUKS2", "/dev/x", False, False, "passphrase", header=str(header))
    for interval, expected in ((60.0, 1), (0.0, 3)):
        reads.clear()
        watch = tokens.TokenWatch(lambda: None, min_interval=interval)
        for _ in range(3):
            watch.check([dev])
            await wait_until_async(lambda w=watch: not w._reading, message="the read ended")
        assert len(reads) == expected, interval
