"""The helper's start-up, in the RAM filesystem: `python3 -I -S -B -m cryptlockd.helper`.

It listens on its socket, loads libcryptsetup, opens the LUKS mappings and locks itself in
RAM while idle, then serves (server.py) until a cycle is done or it is told to stand down.
`--self-test` checks a freshly built RAM filesystem instead; `--recover` is the unit's
ExecStopPost= (recover.py).

The RAM filesystem's closure is what importing this module loads (daemon/ramfs.py), so
everything the helper needs at run time must be imported from here, directly or not.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import signal
import socket
import sys

from cryptlockd.helper import protocol, token
from cryptlockd.helper.hardening import harden
from cryptlockd.helper.journal import WARNING, log
from cryptlockd.helper.libcryptsetup import Library
from cryptlockd.helper.recover import recover, watch
from cryptlockd.helper.secret import SecretBuffer
from cryptlockd.helper.server import serve
from cryptlockd.helper.session import Helper

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from types import FrameType

# What the cycle needs from libcryptsetup, checked by the self-test.
REQUIRED_SYMBOLS = (
    "crypt_init_by_name",
    "crypt_suspend",
    "crypt_resume_by_passphrase",
    "crypt_resume_by_keyfile_device_offset",
    "crypt_free",
)


def self_test() -> int:
    """Imports everything and loads libcryptsetup: run in a chroot of the fresh ramfs."""
    lib = Library()
    missing = [s for s in REQUIRED_SYMBOLS if not lib.has(s)]
    with SecretBuffer(64) as secret:
        secret.view()[:4] = b"test"
    result = {
        "ok": not missing and secret.is_zero(),
        "missing_symbols": missing,
        "libcryptsetup": lib.version(),
        "tpm2_token": token.load_tpm2(lib),
        "python": sys.version.split()[0],
        "modules": sorted(m for m in sys.modules if m.startswith("cryptlockd")),
    }
    print(json.dumps(result))
    return 0 if result["ok"] else 1


def _stop(signum: int, frame: FrameType | None) -> None:
    raise SystemExit(0)


def listen(path: str) -> socket.socket:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    old = os.umask(0o077)
    try:
        listener.bind(path)
    finally:
        os.umask(old)
    listener.listen(4)
    return listener


def main(argv: list[str]) -> int:
    if "--self-test" in argv:
        return self_test()
    if "--recover" in argv:
        return recover(dict(os.environ))
    if "--watchdog" in argv:
        return watch(int(argv[argv.index("--watchdog") + 1]))
    signal.signal(signal.SIGTERM, _stop)
    os.makedirs(os.path.dirname(protocol.SOCKET_IN_RAMFS), exist_ok=True)
    os.makedirs(os.path.dirname(protocol.FROZEN_STATE_IN_RAMFS), exist_ok=True)
    listener = listen(protocol.SOCKET_IN_RAMFS)
    helper = Helper()
    # Loaded now, while idle: arming then has no library to load and no header to read.
    helper.library = Library()
    helper.preload()
    # Hardened now too: mlockall faults in every page mapped so far, 20-26 ms under TCG
    # that logind waited for when it came at the arm (issue 12). Those pages are mostly
    # the RAM filesystem's, in RAM anyway. Should it fail, the arm tries again, and fails.
    try:
        harden()
    except OSError as e:
        log(WARNING, f"cannot lock the idle helper in RAM ({e}); arming tries again")
    # What start-up left stays out of the cycle collector's way (daemon/main.settle_heap).
    gc.collect()
    gc.freeze()
    try:
        return serve(helper, listener)
    finally:
        listener.close()
        with contextlib.suppress(FileNotFoundError):
            os.unlink(protocol.SOCKET_IN_RAMFS)
