"""The LUKS2 tokens of the protected devices, for Check() (issue 14): which the resume prompt
offers (TPM2 with a PIN, helper/token.py) and which it never uses. A TPM2 token without a
PIN is named: the TPM would unseal for whoever opens the lid, since the PCRs do not change
across S3, so the helper leaves it out and asks for the passphrase. Informational, never
blocking: the keys are wiped either way.

The header is read from the disk (or crypttab's header=) by hand: 4 KiB of binary header,
then its JSON area. Only when the header's sequence id changed is the JSON read again.
Never on the event loop (TokenWatch): a read from a disk that died while asleep, or that
is going away, can wait in D state for good, and the daemon must go on answering."""

from __future__ import annotations

import asyncio
import json
import os
import struct
import threading
import time
from collections.abc import Callable, Mapping, Sequence

from cryptlockd.daemon.checks import CheckResult
from cryptlockd.daemon.devices import LuksDevice
from cryptlockd.helper import token

__all__ = ["TokenWatch", "check_tokens", "parse_tokens", "read_tokens"]

LUKS2_MAGIC = b"LUKS\xba\xbe"
BINARY_HEADER = 4096
# LUKS2's largest header (metadata area) is 4 MiB.
MAX_HEADER = 4 * 1024 * 1024

_cache: dict[str, tuple[int, dict[int, str]]] = {}


def parse_tokens(json_area: bytes) -> dict[int, str]:
    """The JSON area of a LUKS2 header -> its tokens, id -> the token's JSON. Pure."""
    text = json_area.split(b"\0", 1)[0]
    try:
        meta = json.loads(text)
    except ValueError:
        return {}
    tokens = meta.get("tokens") if isinstance(meta, dict) else None
    if not isinstance(tokens, dict):
        return {}
    return {int(k): json.dumps(v) for k, v in tokens.items() if k.isdigit()}


def read_tokens(path: str) -> dict[int, str]:
    """The tokens of the LUKS2 header at `path` (a disk or a detached header); {} for
    LUKS1, no header or an unreadable one."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return {}
    try:
        binary = os.pread(fd, BINARY_HEADER, 0)
        if len(binary) < 24 or binary[:6] != LUKS2_MAGIC:
            return {}
        version, hdr_size, seqid = struct.unpack(">HQQ", binary[6:24])
        if version != 2 or not BINARY_HEADER < hdr_size <= MAX_HEADER:
            return {}
        cached = _cache.get(path)
        if cached is not None and cached[0] == seqid:
            return cached[1]
        tokens = parse_tokens(os.pread(fd, hdr_size - BINARY_HEADER, BINARY_HEADER))
    except OSError:
        return {}
    finally:
        os.close(fd)
    _cache[path] = (seqid, tokens)
    return tokens


def check_tokens(found: Mapping[str, Mapping[int, str]]) -> list[CheckResult]:
    """device -> its tokens (id -> JSON) -> one line per kind of token that matters at the
    prompt; nothing when no device has a TPM2 or FIDO2 token. Pure."""
    offered: list[str] = []
    no_pin: list[str] = []
    fido2: list[str] = []
    for name in sorted(found):
        kinds: dict[str, list[str]] = {}
        for token_id, text in sorted(found[name].items()):
            kinds.setdefault(token.classify(text), []).append(str(token_id))
        for kind, into in (
            (token.PIN_TOKEN, offered),
            (token.NO_PIN_TOKEN, no_pin),
            (token.FIDO2_TOKEN, fido2),
        ):
            if kind in kinds:
                into.append(f"{name} (token {', '.join(kinds[kind])})")
    out = []
    if offered:
        out.append(
            CheckResult(
                "tpm2-pin-token",
                True,
                f"TPM2+PIN tokens of {'; '.join(offered)}: the resume prompt takes the "
                "PIN (or the passphrase)",
                blocking=False,
            )
        )
    if no_pin:
        out.append(
            CheckResult(
                "tpm2-token-without-pin",
                False,
                f"TPM2 tokens without a PIN on {'; '.join(no_pin)} are never used at "
                "resume: the TPM would unseal them for anyone who opens the lid (the PCRs "
                "do not change across suspend); the prompt asks for the passphrase. Enroll "
                "one with systemd-cryptenroll --tpm2-device=auto --tpm2-with-pin=yes",
                blocking=False,
            )
        )
    if fido2:
        out.append(
            CheckResult(
                "fido2-token",
                False,
                f"FIDO2 tokens on {'; '.join(fido2)} are not used at resume; the prompt "
                "asks for the passphrase",
                blocking=False,
            )
        )
    return out


def header_path(device: LuksDevice, by_uuid: str = "/dev/disk/by-uuid") -> str:
    """Where the device's LUKS header is: crypttab's header=, else the block device udev
    names by the LUKS UUID (an LV for LUKS on LVM, which backing_device is not), else
    the backing device."""
    if device.header:
        return device.header
    link = os.path.join(by_uuid, device.uuid)
    return link if device.uuid and os.path.exists(link) else device.backing_device


# A header is read again at most this often, however often Check() is called: a thread and
# a disk read for each call cost a busy client's Check() a third of its rate (bench/bus.py).
MIN_READ_INTERVAL = 1.0


class TokenWatch:
    """The tokens Check() shows: each header is read in a thread of its own, and Check()
    uses what the last read found. A read that never returns costs that device's token
    lines (and a thread), never the daemon: it is not started again while it hangs."""

    def __init__(
        self, changed: Callable[[], None], min_interval: float = MIN_READ_INTERVAL
    ) -> None:
        self._changed = changed  # called on the loop when a read found something new
        self.found: dict[str, dict[int, str]] = {}
        self._reading: set[str] = set()
        self._min_interval = min_interval
        self._started: dict[str, float] = {}  # device -> when its last read began

    def check(self, devices: Sequence[LuksDevice], read: bool = True) -> list[CheckResult]:
        """check_tokens on what was read, and a fresh read of each LUKS2 device's header
        unless `read` is false (a sleep in progress: no disk I/O of ours on its path)."""
        luks2 = {d.name: header_path(d) for d in devices if d.luks_type == "LUKS2"}
        self.found = {n: t for n, t in self.found.items() if n in luks2}
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None  # no loop (a one-shot caller): read here
        for name, path in luks2.items() if read else ():
            if loop is None:
                self.found[name] = read_tokens(path)
            elif name not in self._reading and not self._recent(name):
                self._reading.add(name)
                self._started[name] = time.monotonic()
                threading.Thread(
                    target=self._read, args=(loop, name, path), daemon=True, name=f"tokens {name}"
                ).start()
        return check_tokens(self.found)

    def _recent(self, name: str) -> bool:
        started = self._started.get(name)
        return started is not None and time.monotonic() - started < self._min_interval

    def _read(self, loop: asyncio.AbstractEventLoop, name: str, path: str) -> None:
        tokens = read_tokens(path)
        if not loop.is_closed():
            loop.call_soon_threadsafe(self._done, name, tokens)

    def _done(self, name: str, tokens: dict[int, str]) -> None:
        self._reading.discard(name)
        if self.found.get(name) != tokens:
            self.found[name] = tokens
            self._changed()
