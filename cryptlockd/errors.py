"""The error hierarchy. Each error that can reach a D-Bus caller carries its name: a subclass
says `error="Name"` and replies as org.cryptlockd1.Error.Name; without it, as its parent."""

from __future__ import annotations

from typing import Any

from cryptlockd.defs import ERROR_PREFIX


class CryptlockdError(Exception):
    """Base of every error this project raises on purpose."""

    dbus_name = f"{ERROR_PREFIX}.Failed"

    def __init_subclass__(cls, error: str | None = None, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if error is not None:
            cls.dbus_name = f"{ERROR_PREFIX}.{error}"


class NotAuthorized(CryptlockdError, error="NotAuthorized"):
    """polkit said no, failed, timed out, or the caller left while it was asked."""


class ConfigError(CryptlockdError, error="ConfigInvalid"):
    """A config file is unreadable or invalid. The message names the file and the key."""


class NoSuchDevice(CryptlockdError, error="NoSuchDevice"):
    """GetDevice() of a name that is not an active LUKS device."""


class Busy(CryptlockdError, error="Busy"):
    """Suspend() or Lock() while a sleep or a lock is already in progress."""


class NotProtected(CryptlockdError, error="NotProtected"):
    """Suspend() or Lock() when the cycle would not wipe the keys."""


class LockFailed(CryptlockdError, error="LockFailed"):
    """Lock() could not start the cycle (the helper did not arm or begin); the keys stay in
    RAM, and LastCycle says why."""


class Inhibited(CryptlockdError, error="Inhibited"):
    """Suspend() refused because of a block inhibitor, as logind would refuse the caller.
    The message names each inhibitor: who, why, pid."""


class LogindError(CryptlockdError, error="LogindUnavailable"):
    """logind refused or could not be asked (Suspend, the inhibitor)."""


class CommandError(CryptlockdError):
    """A subprocess failed; carries the command line and the exit status."""

    def __init__(self, argv: list[str], returncode: int, stderr: str = "") -> None:
        self.argv = argv
        self.returncode = returncode
        self.stderr = stderr
        detail = f": {stderr.strip().splitlines()[-1]}" if stderr.strip() else ""
        super().__init__(f"{' '.join(argv)} exited with status {returncode}{detail}")


class RemoteError(CryptlockdError):
    """A D-Bus call we made failed: an error reply, a timeout, or a lost connection."""

    def __init__(self, what: str, error_name: str, text: str) -> None:
        self.what = what
        self.error_name = error_name
        self.text = text
        super().__init__(f"{what}: {error_name}: {text}")
