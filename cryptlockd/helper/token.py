"""LUKS2 tokens at the resume prompt: a TPM2 token with a PIN (systemd-cryptenroll
--tpm2-device=auto --tpm2-with-pin=yes) opens a device with the line typed at the prompt,
through libcryptsetup's token API (crypt_resume_by_token_pin, libcryptsetup 2.5 or later)
and systemd's token plugin, which the RAM filesystem carries (daemon/ramfs.py).

Only a TPM2 token that asks for a PIN is ever tried. One without a PIN would unseal for
whoever opens the lid: the PCRs do not change across S3, so the TPM sees the same machine
in the same state. Those tokens are never passed to libcryptsetup (never CRYPT_ANY_TOKEN,
which would try them), and the daemon's Check() names them (daemon/tokens.py). FIDO2
tokens are not used: the test bed cannot emulate an authenticator, so the path is left out
rather than shipped untested.

The cost order of one line (resume.Resumer.round): it is tried as a PIN first, then as a
passphrase. A PIN try costs one TPM unseal (a fraction of a second) and, when the line is
not the PIN, one strike of the TPM's dictionary-attack counter; a passphrase try costs a
full Argon2 run per keyslot (seconds, and the KDF memory). Trying the passphrase first
would make every PIN wait for all of those. To spend as few strikes as possible, once the
TPM refuses the line as a PIN, it is not tried as a PIN on the other devices of that round.
Past the TPM's lockout threshold the token keeps failing at once and the passphrase still
opens the disks.

The PIN is the prompt's SecretBuffer: libcryptsetup gets its address, never a copy.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os

TYPE_CHECKING = False  # see cycle.py
if TYPE_CHECKING:
    from cryptlockd.helper.libcryptsetup import Device, Library
    from cryptlockd.helper.resume import Resumer
    from cryptlockd.helper.secret import SecretBuffer

TOKENS_MAX = 32  # LUKS2_TOKENS_MAX
CRYPT_TOKEN_INACTIVE = 1
TPM2 = "systemd-tpm2"
FIDO2 = "systemd-fido2"

# What a token is, for the prompt and for Check() (daemon/tokens.py has the daemon's view).
PIN_TOKEN = "tpm2-pin"
NO_PIN_TOKEN = "tpm2-no-pin"
FIDO2_TOKEN = "fido2"
OTHER_TOKEN = "other"


# systemd's TPM2 token plugin, in libcryptsetup's token directory, and what systemd's TPM2
# code dlopen()s by soname when it unseals (the ESAPI, and the TCTI for /dev/tpmrm0).
TPM2_PLUGIN = "libcryptsetup-token-systemd-tpm2.so"
TPM2_LIBRARIES = (
    "libtss2-esys.so.0",
    "libtss2-rc.so.0",
    "libtss2-mu.so.0",
    "libtss2-tcti-device.so.0",
)


def plugin_path(library: Library) -> str:
    """Where libcryptsetup looks for the TPM2 plugin; "" without external tokens."""
    if not library.has("crypt_token_external_path"):
        return ""
    fn = library.lib.crypt_token_external_path
    fn.restype = ctypes.c_char_p
    directory = fn()
    return os.path.join(directory.decode(), TPM2_PLUGIN) if directory else ""


def load_tpm2(library: Library) -> str:
    """Loads the TPM2 plugin and the libraries it opens at unseal time, so they are mapped:
    daemon/ramfs.py computes the RAM filesystem's closure from what is mapped, and the
    self-test, run in that filesystem, shows that they load there. Returns "ok", "not
    installed" or what failed to load."""
    plugin = plugin_path(library)
    if not plugin or not os.path.exists(plugin):
        return "not installed"
    failed = []
    for path in (plugin, *TPM2_LIBRARIES):
        try:
            ctypes.CDLL(path)
        except OSError as e:
            failed.append(f"{path}: {e}")
    return "; ".join(failed) or "ok"


def classify(token_json: str) -> str:
    """One token's JSON (the LUKS2 header's tokens[id]) -> what it is. Pure."""
    try:
        token = json.loads(token_json)
    except ValueError:
        return OTHER_TOKEN
    if not isinstance(token, dict):
        return OTHER_TOKEN
    kind = token.get("type")
    if kind == TPM2:
        # systemd-cryptenroll writes "tpm2-pin": true with --tpm2-with-pin=yes; older
        # tokens have no such field and no PIN.
        return PIN_TOKEN if token.get("tpm2-pin") is True else NO_PIN_TOKEN
    if kind == FIDO2:
        return FIDO2_TOKEN
    return OTHER_TOKEN


def pin_token_ids(tokens: dict[int, str]) -> list[int]:
    """The token ids (id -> JSON) the prompt may try a PIN on: TPM2 tokens with a PIN."""
    return sorted(i for i, j in tokens.items() if classify(j) == PIN_TOKEN)


def _bind(library: Library) -> bool:
    """Declares the token calls' types once; False without the token API (before 2.5)."""
    if not library.has("crypt_resume_by_token_pin"):
        return False
    lib = library.lib
    if lib.crypt_resume_by_token_pin.argtypes is None:
        lib.crypt_token_status.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_char_p),
        ]
        lib.crypt_token_json_get.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.POINTER(ctypes.c_char_p),
        ]
        # The PIN as a plain address (c_void_p), so ctypes makes no bytes of it.
        lib.crypt_resume_by_token_pin.argtypes = [
            ctypes.c_void_p,
            ctypes.c_char_p,
            ctypes.c_char_p,
            ctypes.c_int,
            ctypes.c_void_p,
            ctypes.c_size_t,
            ctypes.c_void_p,
        ]
    return True


def read_tokens(device: Device) -> dict[int, str]:
    """The device's active tokens, id -> JSON, from the header loaded in `device` (no I/O:
    reload() reads the header again after the wake)."""
    library = device.library
    if not _bind(library) or device.luks_type() != "LUKS2":
        return {}
    lib = library.lib
    tokens = {}
    for i in range(TOKENS_MAX):
        kind = ctypes.c_char_p()
        if lib.crypt_token_status(device.cd, i, ctypes.byref(kind)) <= CRYPT_TOKEN_INACTIVE:
            continue
        text = ctypes.c_char_p()
        if lib.crypt_token_json_get(device.cd, i, ctypes.byref(text)) >= 0 and text.value:
            tokens[i] = text.value.decode(errors="replace")
    return tokens


def has_pin_token(device: Device) -> bool:
    return bool(pin_token_ids(read_tokens(device)))


def prompt_word(devices: dict[str, Device], names: list[str]) -> str:
    """What the prompt asks for: the PIN too when a device asked for has a TPM2+PIN token.
    Never raises: the prompt must come whatever the token API says."""
    try:
        with_pin = any(has_pin_token(devices[n]) for n in names if n in devices)
    except Exception:
        with_pin = False
    return "TPM2 PIN or passphrase" if with_pin else "Passphrase"


class TokenFailed(Exception):
    """A PIN token could not be used for another reason than a refused PIN."""


# What a refused PIN comes back as depends on systemd's version: ENOANO (PIN wrong or
# missing), EPERM, ENOENT (libcryptsetup turns a plugin's EPERM into ENOENT), EACCES,
# EILSEQ, ENOLCK (the TPM's dictionary-attack lockout), and ENOTRECOVERABLE, which is
# how bookworm's systemd 252 passes on the TPM's TPM_RC_AUTH_FAIL (tests/vm/test_tpm.py).
# Anything else means the token cannot work (no TPM, no plugin) and is worth a problem.
_REFUSED = tuple(
    -e
    for e in (
        errno.ENOANO,
        errno.EPERM,
        errno.ENOENT,
        errno.EACCES,
        errno.EILSEQ,
        errno.ENOLCK,
        errno.ENOTRECOVERABLE,
    )
)


def resume_by_pin(device: Device, address: int, length: int) -> bool | None:
    """The line at `address` as the PIN of each of the device's TPM2+PIN tokens. None: the
    device has none (nothing was tried, no TPM strike spent); True: one opened it; False:
    refused. Raises TokenFailed when a token failed for another reason (no TPM, no plugin)."""
    ids = pin_token_ids(read_tokens(device))
    if not ids:
        return None
    lib = device.library.lib
    name = device.name.encode()
    failure = ""
    for token_id in ids:
        rc = lib.crypt_resume_by_token_pin(
            device.cd, name, TPM2.encode(), token_id, address, length, None
        )
        if rc >= 0:
            return True
        if rc not in _REFUSED:
            messages = device.library.messages
            failure = f"token {token_id}: {os.strerror(-rc)}" + (
                f" ({messages[-1]})" if messages else ""
            )
    if failure:
        raise TokenFailed(failure)
    return False


def try_pin(resumer: Resumer, secret: SecretBuffer) -> bool:
    """The line as a PIN on every ready device with a TPM2+PIN token, and on those its
    successes make ready; stops at the first refusal (each one is a TPM strike). True when
    it opened at least one device."""
    took = False
    for fresh in resumer.batches():
        for dev in fresh:
            try:
                opened = resumer.ops.resume_pin(dev.name, secret)
            except Exception as e:
                problem = f"TPM2 PIN for {dev.name}: {e}"
                if problem not in resumer.record.problems:
                    resumer.record.problems.append(problem)
                continue
            if opened is None:
                continue
            if not opened:
                return took
            took = True
            resumer.record.step(f"token:{dev.name}")
            resumer._resumed(dev)
        resumer.resume_keyfiles()
    return took
